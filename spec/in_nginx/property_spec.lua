-- A property test of resty.counter through the shim,
-- inside a real nginx worker, on ngx.shared.counters2.
--
-- Each round draws a random sequence of operations: incr over random keys
-- (strings with any bytes, number-like strings, numbers, long keys) and
-- steps (default, negative, fractional, zero, large), sync, reset, get,
-- and invalid calls (NaN or infinite steps; empty, too long, nil, boolean,
-- table and NaN keys; reset without a number). A plain Lua model runs the
-- same sequence: increments buffer per key (tostring of a number key) and
-- reach the dict only at sync; reset(k, n) is dict:incr(k, -n, n); an
-- invalid call raises (reset: returns nil, err) and changes nothing. After
-- every operation the dict is compared with the model.
--
-- The rounds never yield, so no timer (another spec may have given
-- counters2 an interval) runs in the middle of one. Seeds are fixed and
-- printed with any failure; PROPERTY_SEED and LONG (if the nginx passes
-- them through `env`) change the seed and the number of rounds.

local counter = require("resty.counter")

local DICT = "counters2"
local SEED = tonumber(os.getenv("PROPERTY_SEED")) or 20261128
local ROUNDS = os.getenv("LONG") == "1" and 2000 or 300
local OPS = 150

local huge, nan = math.huge, 0 / 0
local random = math.random

local function escape(s)
    return (
        tostring(s):gsub("[^%w_%.%-]", function(c)
            return ("%%%02X"):format(c:byte())
        end)
    )
end

local function show(v)
    if type(v) == "string" then
        return #v > 40
                and ('"' .. escape(v:sub(1, 40)) .. '"...(' .. #v .. " bytes)")
            or '"' .. escape(v) .. '"'
    end
    return tostring(v)
end

---------------------------------------------------------------------------
-- What a round draws from
---------------------------------------------------------------------------

local LONG_KEY = ("L"):rep(1000)
local MAX_KEY = ("M"):rep(65535)

local function random_bytes(n)
    local t = {}
    for i = 1, n do
        t[i] = string.char(random(0, 255))
    end
    return table.concat(t)
end

-- A pool of keys for one round: few enough that keys repeat.
local function key_pool()
    local pool = {
        "a",
        "b",
        "hits",
        "1",
        "1.0",
        "01",
        " 1",
        "1e0",
        "-0",
        1,
        2.5,
        -3,
        0,
        1000,
        0.1,
        "\0",
        "a\0b",
        LONG_KEY,
    }
    for _ = 1, 6 do
        pool[#pool + 1] = random_bytes(random(1, 12))
    end
    if random() < 0.2 then
        pool[#pool + 1] = MAX_KEY
    end
    return pool
end

local STEPS = { 1, -1, 0.5, -0.25, 3, 0.1, -2.5, 0, 1e6, 7, -0.75, 1e-3 }
local RESETS = { 1, 2.5, -1, 0, 10 }
local BAD_KEYS = { "", ("x"):rep(65536), true, {}, nan }
local BAD_STEPS = { nan, huge, -huge }

---------------------------------------------------------------------------
-- The model
---------------------------------------------------------------------------

local function new_model()
    return { buf = {}, dict = {} }
end

local function model_incr(m, key, step)
    local k = tostring(key)
    m.buf[k] = (m.buf[k] or 0) + (step == nil and 1 or step)
end

local function model_sync(m)
    for k, v in pairs(m.buf) do
        m.dict[k] = (m.dict[k] or 0) + v
    end
    m.buf = {}
end

local function model_reset(m, key, n)
    local k = tostring(key)
    local v = m.dict[k]
    if v == nil then
        v = -n + n
    else
        v = v + -n
    end
    m.dict[k] = v
    return v
end

---------------------------------------------------------------------------
-- One round against a counter module
---------------------------------------------------------------------------

local function clear(c, dict)
    c:sync()
    dict:flush_all()
    dict:flush_expired()
end

-- Runs one round; returns nil, or a message naming the first difference.
local function round(mod, seed)
    local dict = ngx.shared[DICT]
    local c = mod.new(DICT)
    clear(c, dict)
    math.randomseed(seed)
    local pool = key_pool()
    local m = new_model()
    local trace = {}

    local function fail(what)
        return ("seed %d, op %d (%s): %s\nlast ops: %s"):format(
            seed,
            #trace,
            trace[#trace] or "-",
            what,
            table.concat(trace, "; ", math.max(1, #trace - 8))
        )
    end

    -- Every key of the model and of the dict agree.
    local function compare_all()
        local n = 0
        for k, v in pairs(m.dict) do
            n = n + 1
            local got = dict:get(k)
            if got ~= v then
                return fail(
                    "key "
                        .. show(k)
                        .. ": model "
                        .. show(v)
                        .. ", dict "
                        .. show(got)
                )
            end
        end
        -- The counter's own get_keys leaves the shared stage's reserved key out.
        local keys = c:get_keys(0)
        if #keys ~= n then
            for _, k in ipairs(keys) do
                if m.dict[k] == nil then
                    return fail(
                        "unexpected key in dict: "
                            .. show(k)
                            .. " = "
                            .. show(dict:get(k))
                    )
                end
            end
            return fail(#keys .. " keys in dict, model has " .. n)
        end
    end

    local function compare_key(key)
        local k = tostring(key)
        local got = dict:get(k)
        if got ~= m.dict[k] then
            return fail(
                "key "
                    .. show(k)
                    .. ": model "
                    .. show(m.dict[k])
                    .. ", dict "
                    .. show(got)
            )
        end
    end

    for _ = 1, OPS do
        local r = random()
        local err
        if r < 0.55 then
            local key = pool[random(#pool)]
            local step = random() < 0.2 and nil or STEPS[random(#STEPS)]
            trace[#trace + 1] = "incr("
                .. show(key)
                .. ", "
                .. show(step)
                .. ")"
            local ok, e = pcall(c.incr, c, key, step)
            if not ok then
                return fail("incr raised: " .. tostring(e))
            end
            model_incr(m, key, step)
            err = compare_key(key) -- buffered: the dict has not moved
        elseif r < 0.70 then
            trace[#trace + 1] = "sync()"
            c:sync()
            model_sync(m)
            err = compare_all()
        elseif r < 0.78 then
            local key = pool[random(#pool)]
            local n = RESETS[random(#RESETS)]
            trace[#trace + 1] = "reset(" .. show(key) .. ", " .. show(n) .. ")"
            local got = c:reset(key, n)
            local want = model_reset(m, key, n)
            if got ~= want then
                err = fail(
                    "reset returned " .. show(got) .. ", model " .. show(want)
                )
            else
                err = compare_key(key)
            end
        elseif r < 0.86 then
            local key = pool[random(#pool)]
            trace[#trace + 1] = "get(" .. show(key) .. ")"
            local got = c:get(key)
            if got ~= m.dict[tostring(key)] then
                err = fail(
                    "get returned "
                        .. show(got)
                        .. ", model "
                        .. show(m.dict[tostring(key)])
                )
            end
        elseif r < 0.93 then
            local key, step
            if random() < 0.5 then
                key, step = BAD_KEYS[random(#BAD_KEYS)], STEPS[random(#STEPS)]
            else
                key, step = pool[random(#pool)], BAD_STEPS[random(#BAD_STEPS)]
            end
            trace[#trace + 1] = "bad incr("
                .. show(key)
                .. ", "
                .. show(step)
                .. ")"
            if pcall(c.incr, c, key, step) then
                err = fail("an invalid incr was accepted")
            end
        else
            local key = pool[random(#pool)]
            local n = ({ nan, "x" })[random(2)]
            trace[#trace + 1] = "bad reset("
                .. show(key)
                .. ", "
                .. show(n)
                .. ")"
            local ok, got = pcall(c.reset, c, key, n)
            if not ok or got ~= nil then
                err = fail("an invalid reset was not refused: " .. show(got))
            else
                err = compare_key(key)
            end
        end
        if err then
            clear(c, dict)
            return err
        end
    end

    trace[#trace + 1] = "final sync()"
    c:sync()
    model_sync(m)
    local err = compare_all()
    clear(c, dict)
    return err
end

describe("property: resty.counter against a model, inside nginx", function()
    it(
        ("agrees with the model over %d rounds of %d operations (seed %d)"):format(
            ROUNDS,
            OPS,
            SEED
        ),
        function()
            for i = 1, ROUNDS do
                local err = round(counter, SEED + i)
                assert(err == nil, err)
            end
        end
    )

    it(
        "the original algorithm disagrees with the model (it accepts NaN and "
            .. "infinite steps, bad keys, and poisons or drops them)",
        function()
            local original = require("bench.reference_counter")
            local failures, first = 0, nil
            for i = 1, 20 do
                local ok, err = pcall(round, original, SEED + i)
                err = ok and err or ("raised: " .. tostring(err))
                if err then
                    failures = failures + 1
                    first = first or err
                end
            end
            ngx.shared[DICT]:flush_all()
            ngx.shared[DICT]:flush_expired()
            assert.is_true(failures > 0)
            assert.truthy(first)
        end
    )
end)
