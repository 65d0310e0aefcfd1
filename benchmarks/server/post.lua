-- wrk script: POST the body in $WRK_BODY_FILE with Content-Type $WRK_CONTENT_TYPE.
-- Usage: WRK_BODY_FILE=body.json wrk -t2 -c32 -d10s --latency -s post.lua http://127.0.0.1:8000/path
local path = os.getenv("WRK_BODY_FILE")
assert(path, "set WRK_BODY_FILE to the request body's file")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/json"
