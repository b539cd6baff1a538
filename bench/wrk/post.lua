-- wrk script for Ferry's benchmark (bench/run.sh): POSTs the file named by $WRK_BODY_FILE as
-- a JSON body, optionally with Host: $WRK_HOST (localtunnel routes on the Host header), and
-- prints one machine-readable summary line at the end:
--   BENCH requests=N duration_us=D rps=R p50_us=.. p90_us=.. p99_us=.. non2xx=N errors=N
local f = assert(io.open(os.getenv("WRK_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local host = os.getenv("WRK_HOST")
if host and host ~= "" then
  wrk.headers["Host"] = host
end

function done(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.timeout
  io.write(string.format(
    "BENCH requests=%d duration_us=%d rps=%.2f p50_us=%d p90_us=%d p99_us=%d non2xx=%d errors=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    e.status, errors))
end
