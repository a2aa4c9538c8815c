"""One module per Ray Serve application: ``Args`` + deployments + ``build_app(args)``."""
