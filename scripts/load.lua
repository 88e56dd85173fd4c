-- wrk script for scripts/load.sh: POST /api/v1/calls rotating the issue's mix of numbers,
-- and a count of answers by status. The token comes from the environment (IVR_LOAD_TOKEN).
local numbers = {
  "+15550000005", "+15550000005", "+15550000005", "+15550000005", -- answers at once, 1 s talk
  "+15550000002",                                                 -- busy
  "+15550000006",                                                 -- rejects
  "+15550009999",                                                 -- unknown number
}
local token = os.getenv("IVR_LOAD_TOKEN")
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  i = 0
  counts = {}
end

function request()
  i = i + 1
  local body = '{"phone_number": "' .. numbers[(i - 1) % #numbers + 1] .. '"}'
  return wrk.format("POST", "/api/v1/calls", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. token,
  }, body)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do
    io.write(string.format("wrk-status %d %d\n", status, n))
  end
end
