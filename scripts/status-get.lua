-- wrk script: GET /api/v1/status/{id} (or the PATHS prefix) for ids drawn at random from IDS_FILE,
-- with the bearer token in TOKEN. Both come from the environment.
local ids = {}
local token = os.getenv("TOKEN") or ""
local prefix = os.getenv("PATH_PREFIX") or "/api/v1/status/"

init = function(args)
  local file = os.getenv("IDS_FILE")
  if file then
    for line in io.lines(file) do
      if #line > 0 then ids[#ids + 1] = line end
    end
  end
  if #ids == 0 then ids[1] = "none" end
  math.randomseed(os.time() + (args[1] and tonumber(args[1]) or 0))
end

request = function()
  local id = ids[math.random(#ids)]
  return wrk.format("GET", prefix .. id, { ["Authorization"] = "Bearer " .. token })
end
