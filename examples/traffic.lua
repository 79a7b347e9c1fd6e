-- wrk script for examples/demo.sh: spreads requests over the demo's routes
-- (examples/nginx.conf), a few of them more often than others.
local paths = {
    "/",
    "/",
    "/api/users",
    "/api/users",
    "/api/users",
    "/api/orders",
    "/api/orders",
    "/login",
    "/admin",
    "/no/such/page",
}
local n = 0

function request()
    n = n + 1
    return wrk.format("GET", paths[n % #paths + 1])
end
