-- Fills a shared dict with small numbers, for specs that need a full dict.
-- Required inside nginx (the specs' Lua path has the repository root).
--
--   local n = require("spec.support.fill").small(ngx.shared.full)
--
-- small(d) sets keys "f000001", "f000002", ... to 0 until the dict is full,
-- then touches them in a shuffled order (a fixed seed), so the least
-- recently used ones are spread over all slab pages. Returns how many.
-- luacheck: globals ngx
local _M = {}

function _M.small(d)
    local names = {}
    while true do
        local k = ("f%06d"):format(#names + 1)
        if not d:safe_set(k, 0) then
            break
        end
        names[#names + 1] = k
    end
    math.randomseed(7)
    for i = #names, 2, -1 do
        local j = math.random(i)
        names[i], names[j] = names[j], names[i]
    end
    for _, k in ipairs(names) do
        d:get(k)
    end
    return #names
end

return _M
