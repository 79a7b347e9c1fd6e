-- What the many-worker benchmarks (scale.lua, stall_stage.lua) make in each
-- worker: the keys every worker dirties, and the counter of a contender.
-- Required inside nginx as "bench.contenders".
local _M = {}

-- K Prometheus-like keys of the metric `name`.
function _M.keys(name, k)
    local keys = {}
    for i = 1, k do
        keys[i] = name .. '{route="r' .. i .. '",code="200"}'
    end
    return keys
end

-- The counter of contender `mode` on shared dict `dict`, synced each
-- second: "original" (bench/reference_counter.lua), "project" or its
-- alias "stage" (resty.counter as configured by default, its stage
-- `stage_bytes` long), "direct" (resty.counter with the stage off); nil
-- for "control", which counts nothing.
function _M.new(mode, dict, stage_bytes)
    if mode == "original" then
        return require("bench.reference_counter").new(dict, 1)
    elseif mode == "project" or mode == "stage" then
        return assert(require("resty.counter").new(dict, 1, nil, {
            stage_bytes = stage_bytes,
        }))
    elseif mode == "direct" then
        return assert(
            require("resty.counter").new(dict, 1, nil, { stage = false })
        )
    end
    assert(mode == "control", "unknown contender " .. tostring(mode))
end

return _M
