-- wrk script: POST one digits row to the KServe V1 predict route of the target.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"instances": [[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]]}'

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
