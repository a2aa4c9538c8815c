-- wrk script: POST one sentence to the OpenAI-compatible embeddings route of the target.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "all-MiniLM-L6-v2", "input": ["Ray Serve batches requests from many clients into one forward pass."]}'

-- Every answer but a 200 is counted as failed, redirects too (a fast 307 is not throughput):
-- each thread counts its own, and done() adds them up.
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
failed = 0
response = function(status, headers, body)
  if status ~= 200 then failed = failed + 1 end
end
done = function(summary, latency, requests)
  local bad = summary.errors.connect + summary.errors.read + summary.errors.timeout
  for _, thread in ipairs(threads) do bad = bad + thread:get("failed") end
  io.write(string.format("AIAAS_RESULT %d %d %.1f %.1f %.1f\n", summary.requests, bad,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
