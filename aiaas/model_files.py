"""The files of a torch model version, as aiaas writes them and a replica rebuilds the model.

Nothing here unpickles arbitrary Python objects:

- ``torch``: the zoo network's state dict as safetensors (raw tensors and a JSON header), plus
  ``aiaas_model.json`` naming the network, so the loader rebuilds it from :mod:`aiaas.models`.
- ``dynamic-int8``: quantized packed params are not plain tensors (safetensors refuses their
  ``torch.dtype`` entries), so the state dict is a torch file read with
  ``torch.load(weights_only=True)``, whose unpickler builds only tensors, dtypes and containers.
  The loader rebuilds the zoo network and quantizes it before loading that state.
- ``torchscript``: ``torch.jit.load`` reads the archive with TorchScript's own deserializer,
  which builds TorchScript types only (never Python globals); the graph it runs is TorchScript,
  not Python. The artifact's digest (:mod:`aiaas.artifact_digests`) makes sure it is the archive
  the optimize job traced.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PositiveInt

from aiaas import errors
from aiaas.config.base import ConfigModel
from aiaas.config.train import ModelSpec

if TYPE_CHECKING:
    from torch import nn

#: The record of what the artifact holds, at its top.
RECORD = "aiaas_model.json"
#: Where each torch format keeps its weights, relative to the artifact.
WEIGHTS = {
    "torch": "data/weights.safetensors",
    "dynamic-int8": "data/state.pt",
    "torchscript": "data/model.pt",
}
TorchFormat = Literal["torch", "dynamic-int8", "torchscript"]


class Network(ConfigModel):
    """A zoo network and the data shape it was built for: enough to build it again."""

    model: ModelSpec = Field(description="the zoo network and its sizes")
    in_features: PositiveInt = Field(description="features per row")
    num_classes: PositiveInt = Field(description="logits per row")
    feature_shape: list[PositiveInt] | None = Field(
        None, description="cnn: the image shape (channels, height, width) of a row"
    )


class Record(ConfigModel):
    """``aiaas_model.json``: the format of a torch artifact and, unless scripted, its network."""

    format: TorchFormat = Field(description="how the weights are stored and loaded")
    network: Network | None = Field(
        None, description="the zoo network to rebuild (none for TorchScript, a whole graph)"
    )


def network_of(module: nn.Module) -> Network:
    """The zoo network a module is (eager or dynamically quantized), read off its layers.

    Raises:
        ConfigError: The module is not a network of the zoo.
    """
    from torch import nn

    from aiaas import models

    dropout = next((m.p for m in module.modules() if isinstance(m, nn.Dropout)), None)
    kept = {"dropout": dropout} if dropout is not None else {}
    if isinstance(module, models.MLP):
        # Linear layers, eager or quantized (both have in_features and out_features).
        linears: list[Any] = [m for m in module.net if hasattr(m, "out_features")]
        return Network(
            model=ModelSpec(
                name="mlp", hidden_sizes=[layer.out_features for layer in linears[:-1]], **kept
            ),
            in_features=linears[0].in_features,
            num_classes=linears[-1].out_features,
        )
    if isinstance(module, models.SmallCNN):
        convs = [m for m in module.features if isinstance(m, nn.Conv2d)]
        return Network(
            model=ModelSpec(name="cnn", channels=[conv.out_channels for conv in convs], **kept),
            in_features=math.prod(module.shape),
            num_classes=module.head[-1].out_features,
            feature_shape=list(module.shape),
        )
    raise errors.ConfigError(
        f"cannot register a {type(module).__name__}: aiaas stores a model as weights of a zoo "
        "network (mlp or cnn) and builds the network again when it loads",
        "Build the model with aiaas.models.build (model.name: mlp or cnn).",
    )


def quantize_dynamic(module: nn.Module) -> nn.Module:
    """The module with its Linear layers dynamically quantized to int8 (a copy)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's move to torchao, quantized tensors' future
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def save(module: Any, directory: Path, model_format: TorchFormat) -> Record:
    """Write a module's weights and its record into an artifact directory."""
    import torch

    weights = directory / WEIGHTS[model_format]
    weights.parent.mkdir(parents=True, exist_ok=True)
    network = None
    if model_format == "torchscript":
        torch.jit.save(module, str(weights))
    else:
        network = network_of(module)
        state = module.state_dict()
        if model_format == "torch":
            from safetensors.torch import save_file

            save_file({key: value.contiguous() for key, value in state.items()}, str(weights))
        else:
            torch.save(state, weights)
    record = Record(format=model_format, network=network)
    (directory / RECORD).write_text(record.model_dump_json(indent=2) + "\n")
    return record


def load(directory: Path) -> Any:
    """The module an artifact directory holds, on the CPU, in eval mode.

    Raises:
        FileNotFoundError: The record or the weights are missing. ValueError: the record is not
            one aiaas writes (pydantic's ValidationError).
    """
    import torch

    record = Record.model_validate_json((directory / RECORD).read_text())
    # The file name comes from the format, never from the record: no path to lead elsewhere.
    weights = directory / WEIGHTS[record.format]
    if record.format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's, on every load
            return torch.jit.load(str(weights), map_location="cpu").eval()
    if record.network is None:
        raise ValueError(f"{RECORD} names no network for a '{record.format}' model")
    from aiaas import models

    network = record.network
    module = models.build(
        network.model, network.in_features, network.num_classes, network.feature_shape
    )
    if record.format == "dynamic-int8":
        module = quantize_dynamic(module.eval())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on quantized storage
            state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(weights), device="cpu")
    module.load_state_dict(state, strict=True)
    return module.eval()
