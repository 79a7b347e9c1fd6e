-- Small statistics shared by the benchmark scripts (run from the
-- repository root: require("bench.stats")).
local _M = {}

-- The median of a list of numbers (the list is not changed); nil if empty.
function _M.median(t)
    if not t or #t == 0 then
        return nil
    end
    local s = {}
    for i, v in ipairs(t) do
        s[i] = v
    end
    table.sort(s)
    local n = #s
    if n % 2 == 1 then
        return s[(n + 1) / 2]
    end
    return (s[n / 2] + s[n / 2 + 1]) / 2
end

return _M
