-- wrk script for `POST /websocket/ticket`: each request carries the next
-- bearer token of the file named by WRK_TOKENS (one token a line). With
-- distinct tokens no request is a verification cache hit, because the thread
-- stops when the file is used up. A file with one token sends it every time.
-- NOTE: wrk still divides by the whole -d duration, so when the tokens run
-- out first its Requests/sec is a lower bound; use more tokens or a shorter -d.
local tokens = {}
for line in io.lines(os.getenv("WRK_TOKENS")) do
  if #line > 0 then
    tokens[#tokens + 1] = line
  end
end
local sent = 0

request = function()
  sent = sent + 1
  local token = tokens[(sent - 1) % #tokens + 1]
  return wrk.format("POST", "/websocket/ticket", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Length"] = "0",
  })
end

response = function(status, headers, body)
  if #tokens > 1 and sent >= #tokens then
    wrk.thread:stop()
  end
end
