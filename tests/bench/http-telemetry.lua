-- wrk script: POST ThingsBoard JSON telemetry, rotating over the device
-- tokens in $SLUICE_TOKENS (comma-separated). See docs/benchmarks.md.
local tokens = {}
for t in string.gmatch(os.getenv("SLUICE_TOKENS") or "", "[^,]+") do
  tokens[#tokens + 1] = t
end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  local token = tokens[(i % #tokens) + 1]
  local body = string.format('{"temperature":%d.5,"humidity":%d,"seq_hint":%d}', i % 40, i % 100, i)
  return wrk.format(nil, "/api/v1/" .. token .. "/telemetry", nil, body)
end
