-- Hostile keys.
--
-- Keys come from request bytes: the X-Keys header carries comma-separated
-- keys, each %XX-escaped and decoded in the worker with ngx.unescape_uri;
-- X-Num a number key (tonumber of the header); X-Step / X-Div the step.
-- Two workers with automatic sync (0.2 s), and the spec reads the whole
-- dict back (every key, escaped) and compares it with what it sent: no key
-- missing, none extra, none counted under another key's name. No worker
-- may crash (error log, and the worker pids are unchanged at the end).
--
-- Also: a step an application computes from request bytes can be
-- infinite or NaN (1e999, 0/0). resty.counter refuses it with an error and
-- the key keeps counting; the original buffers it and the key is poisoned
-- (inf or NaN) for good.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local INTERVAL = 0.2
local WRK_SECONDS = H.LONG and 8 or 2

-- lua-nginx-module 0.10.23 (Debian's), ngx_http_lua_ffi_shdict_incr with
-- an init value: a new key is linked into the dict's rbtree BEFORE its
-- bytes are copied into the node, so when its CRC-32 equals an existing
-- key's, the tie is broken by comparing uninitialised bytes. The node can
-- land on the wrong side: that key, and others with the same CRC-32,
-- become unreachable (get() answers nil, the next incr makes another node).
-- ngx.shared.DICT:incr(k, v, 0) and the original go through it;
-- resty.counter creates missing keys with add instead (src/shdict.rs, and
-- docs/RELIABILITY.md), which these specs hold it to.

-- Pairs of keys with the same CRC-32.
local COLLIDING = {
    { "buckeroo", "plumless" },
    {
        H.unescape("%9A%09%AA%ED%AD%7E%95%1F%F0"),
        H.unescape("%CE%AF%A5%2FU%E5%CD%DC%5ES%BDT"),
    },
}

local HTTP = [[
  lua_shared_dict hk_new 32m;
  lua_shared_dict hk_orig 4m;
  lua_shared_dict hk_wrk 64m;
  lua_shared_dict hk_crc 1m;
  map $arg_d $wrk_log { hk_wrk 1; default 0; }
  log_format keys '$http_x_keys';
]]

local SERVER = [[
  large_client_header_buffers 4 256k;
  location = /hit {
    access_log ${PREFIX}/logs/keys.log keys if=$wrk_log;
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local mod = ngx.var.arg_m == "orig" and H.ORIGINAL or H.NEW
      local c = require(mod).new(ngx.var.arg_d, ]] .. INTERVAL .. [[)
      local h = ngx.req.get_headers()
      local step = 1
      if h["x-step"] then
        step = tonumber(h["x-step"]) / tonumber(h["x-div"] or "1")
      end
      local out = {}
      if h["x-keys"] then
        for piece in (h["x-keys"] .. ","):gmatch("([^,]*),") do
          out[#out + 1] = pcall(c.incr, c, ngx.unescape_uri(piece), step)
                          and "ok" or "error"
        end
      end
      if h["x-num"] then
        out[#out + 1] = pcall(c.incr, c, tonumber(h["x-num"]), step)
                        and "ok" or "error"
      end
      ngx.print(table.concat(out, ","))
    }
  }
  location = /dump {
    content_by_lua_block {
      ngx.print(require("spec.integration.helpers")
                .dump(ngx.shared[ngx.var.arg_d]))
    }
  }
]]

local WRK_SCRIPT = [[
local next_id = 1
setup = function(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
init = function()
  math.randomseed(id * 7919)
end
request = function()
  local parts = {}
  for i = 1, math.random(1, 24) do
    parts[i] = string.format("%%%02X", math.random(0, 255))
  end
  return wrk.format("GET", "/hit?d=hk_wrk",
                    { ["X-Keys"] = table.concat(parts) })
end
]]

describe("#integration hostile keys", function()
    local srv, pids
    local sent = {} -- raw key -> expected value in hk_new

    setup(function()
        srv = nginx.start({ workers = 2, http = HTTP, server = SERVER })
        pids = srv:worker_pids()
    end)

    teardown(function()
        if srv then
            srv:stop()
        end
    end)

    -- Sends keys (raw bytes) in one request; returns the per-key answers.
    local function send(keys, opts)
        opts = opts or {}
        local escaped = {}
        for i, k in ipairs(keys) do
            escaped[i] = H.escape(k)
        end
        local headers = {
            ["X-Keys"] = table.concat(escaped, ","),
            ["X-Num"] = opts.num,
            ["X-Step"] = opts.step,
            ["X-Div"] = opts.div,
        }
        if #keys == 0 then
            headers["X-Keys"] = nil
        end
        local status, body = srv:get(
            "/hit?d=" .. (opts.dict or "hk_new") .. "&m=" .. (opts.m or "new"),
            headers
        )
        assert.equal(200, status, body)
        return body
    end

    local function expect(key, n)
        sent[key] = (sent[key] or 0) + n
    end

    local function dump(dict)
        local status, body = srv:get("/dump?d=" .. dict, nil, 30)
        assert.equal(200, status)
        return H.parse_dump(body)
    end

    -- Reads the dict until it equals `want` (automatic sync), then compares;
    -- keys in `skip` are left out on both sides.
    local function assert_dict(dict, want, skip)
        skip = skip or {}
        local got
        H.poll(10, function()
            got = dump(dict)
            for k, v in pairs(want) do
                if got[k] ~= v and not skip[k] then
                    return false
                end
            end
            return true
        end)
        for k in pairs(skip) do
            got[k] = nil
        end
        local wrong = {}
        for k, v in pairs(want) do
            if got[k] ~= v and not skip[k] then
                wrong[#wrong + 1] = H.escape(k):sub(1, 60)
                    .. ": want "
                    .. v
                    .. ", got "
                    .. tostring(got[k])
            end
        end
        for k, v in pairs(got) do
            if want[k] == nil then
                wrong[#wrong + 1] = H.escape(k):sub(1, 60)
                    .. ": unexpected, "
                    .. tostring(v)
            end
        end
        table.sort(wrong)
        assert.same(
            {},
            { unpack(wrong, 1, math.min(#wrong, 10)) },
            #wrong .. " keys wrong"
        )
    end

    it(
        "binary keys: every byte value, NUL included, each under its own bytes",
        function()
            local all = {}
            for b = 0, 255 do
                all[#all + 1] = string.char(b)
            end
            local every_byte = table.concat(all)
            for round = 1, 3 do
                local keys = { every_byte }
                expect(every_byte, 1)
                for b = 0, 255 do
                    if b % 3 + 1 >= round then
                        local single, wrapped =
                            string.char(b), "x" .. string.char(b) .. "y"
                        keys[#keys + 1] = single
                        keys[#keys + 1] = wrapped
                        expect(single, 1)
                        expect(wrapped, 1)
                    end
                end
                assert.is_nil(send(keys):find("error", 1, true))
            end
            assert_dict("hk_new", sent)
        end
    )

    it(
        "keys that look like numbers count under their exact bytes; number "
            .. "keys under tostring()",
        function()
            local strings = {
                "1",
                "1.0",
                "01",
                "1e0",
                " 1",
                "1 ",
                "+1",
                "0x1",
                "-0",
                "0",
                "inf",
                "nan",
                "1,",
                "%31",
            }
            assert.is_nil(send(strings):find("error", 1, true))
            for _, k in ipairs(strings) do
                expect(k, 1)
            end
            for _, num in ipairs({
                "1",
                "1.0",
                "1e0",
                "0x1",
                "0.5",
                "1e300",
                "-3",
            }) do
                assert.equal("ok", send({}, { num = num }))
                expect(tostring(tonumber(num)), 1)
            end
            assert_dict("hk_new", sent)
        end
    )

    it(
        "a key of 65535 bytes counts; one of 65536 is refused and counts "
            .. "nowhere; so is the empty key",
        function()
            local longest = ("k"):rep(65535)
            assert.equal("ok", send({ longest }, { step = "7" }))
            expect(longest, 7)
            assert.equal("error", send({ longest .. "k" }, { step = "100" }))
            assert.equal("error", send({ "" }, { step = "100" }))
            assert.equal("error,ok", send({ "", "after-empty" }))
            expect("after-empty", 1)
            assert_dict("hk_new", sent)
        end
    )

    it(
        "an infinite or NaN step from request bytes is refused; the key keeps "
            .. "counting",
        function()
            assert.equal("ok", send({ "victim" }, { step = "5" }))
            assert.equal("error", send({ "victim" }, { step = "1e999" }))
            assert.equal("error", send({ "victim" }, { step = "-1e999" }))
            assert.equal("error", send({ "victim" }, { step = "0", div = "0" }))
            assert.equal("ok", send({ "victim" }, { step = "5" }))
            expect("victim", 10)
            assert_dict("hk_new", sent)
        end
    )

    it("the original: such a step poisons the key for good", function()
        send(
            { "victim", "victim_nan" },
            { m = "orig", dict = "hk_orig", step = "5" }
        )
        send({ "victim" }, { m = "orig", dict = "hk_orig", step = "1e999" })
        send(
            { "victim_nan" },
            { m = "orig", dict = "hk_orig", step = "0", div = "0" }
        )
        send(
            { "victim", "victim_nan" },
            { m = "orig", dict = "hk_orig", step = "5" }
        )
        local got = H.poll(10, function()
            local t = dump("hk_orig")
            return t.victim ~= nil
                and t.victim_nan ~= nil
                and t.victim ~= 5
                and t.victim_nan ~= 5
                and t
        end)
        assert.is_table(got)
        H.sleep(3 * INTERVAL)
        got = dump("hk_orig")
        assert.equal(math.huge, got.victim)
        assert.truthy(
            tostring(got.victim_nan):find("nan"),
            tostring(got.victim_nan)
        )
    end)

    it(
        "tens of thousands of random binary keys under load count exactly",
        function()
            local out = H.wrk({
                url = srv.url,
                script = WRK_SCRIPT,
                seconds = WRK_SECONDS,
                threads = 2,
                connections = 8,
            })
            assert.truthy(out:find("requests in", 1, true), out)
            local want, lines, distinct = {}, 0, 0
            for line in io.lines(srv.prefix .. "/logs/keys.log") do
                local key = H.unescape(line)
                if want[key] == nil then
                    distinct = distinct + 1
                end
                want[key] = (want[key] or 0) + 1
                lines = lines + 1
            end
            if os.getenv("VERBOSE") then
                print(
                    ("wrk: %d requests, %d distinct keys, %d share a CRC-32"):format(
                        lines,
                        distinct,
                        H.count(H.crc32_colliding(want))
                    )
                )
            end
            assert.is_true(distinct > 5000, distinct .. " distinct keys")
            assert_dict("hk_wrk", want, {})
        end
    )

    it(
        "keys with the same CRC-32 both count, and neither hides the other",
        function()
            local want = {}
            for _, pair in ipairs(COLLIDING) do
                assert.equal(H.crc32(pair[1]), H.crc32(pair[2]))
                -- The first key exists before the second is created.
                assert.equal("ok", send({ pair[1] }, { dict = "hk_crc" }))
                want[pair[1]] = 1
                assert_dict("hk_crc", want)
                assert.equal(
                    "ok,ok",
                    send({ pair[2], pair[1] }, { dict = "hk_crc" })
                )
                want[pair[1]], want[pair[2]] = 2, 1
                assert_dict("hk_crc", want)
                assert.equal(
                    "ok,ok",
                    send({ pair[2], pair[1] }, { dict = "hk_crc" })
                )
                want[pair[1]], want[pair[2]] = 3, 2
                assert_dict("hk_crc", want)
            end
        end
    )

    it("no worker crashed", function()
        assert.same(pids, srv:worker_pids())
        assert.same({}, H.crash_lines(srv:error_log()))
    end)
end)
