-- resty.counter.stage: wiring a dict to its shared stage (src/stage.rs,
-- src/zone.rs, docs/DESIGN.md): whether to use one, attaching at this
-- worker's first native sync and retrying a transient failure, leaving it
-- at exit, and the NOTICE and WARN lines that say which mode runs.

local ngx = ngx
local tonumber = tonumber

local abi = require("resty.counter.abi")
local ffi = abi.ffi

local _M = {}

local strerror = abi.strerror
local lib, attach_out, info_out -- once the library is loaded
abi.bind(function(a)
    lib, attach_out, info_out = a.lib, a.attach_out, a.info_out
end)

-- The dict's shared stage (src/stage.rs, docs/DESIGN.md): a region of the
-- stage zone, a lua_shared_dict of the module's own (STAGE_ZONE unless
-- new() names another in opts.stage_dict), so the counter dict holds only
-- counters. Attached at this worker's first native sync, never in the
-- master. Off with one worker (writing directly is cheaper there) and
-- without a stage zone; { stage = true/false } in new() decides instead.
-- One NOTICE per worker and dict says which mode runs. An attach that may
-- succeed later (no room yet: old workers' regions are reclaimed as they
-- exit; the directory busy) is tried again at a later sync, at most once
-- per STAGE_RETRY seconds; meanwhile this worker writes directly, and says
-- so from the second failure on.
local STAGE_ZONE = "resty_counter_stage"
local STAGE_RETRY = 1

local function mode_notice(self, level, ...)
    ngx.log(level, 'resty.counter: shared dict "', self.name, '": ', ...)
end

local function stage_of(self)
    local st = self.stage
    if st ~= nil then
        return st
    end
    if ngx.get_phase() == "init" then
        return false
    end
    local want = self.stage_opt
    local workers = ngx.worker.count()
    if want == nil then
        want = workers > 1
    end
    local zone_name = self.stage_dict or STAGE_ZONE
    local zone = ngx.shared[zone_name]
    if not want or not zone then
        self.stage = false
        if not want then
            mode_notice(
                self,
                ngx.NOTICE,
                "each sync writes into the dict directly (",
                workers == 1 and "one worker" or "stage = false",
                ")"
            )
        else
            mode_notice(
                self,
                self.stage_opt and ngx.WARN or ngx.NOTICE,
                workers,
                " workers each write into the dict directly: no stage zone;",
                ' "lua_shared_dict ',
                zone_name,
                ' 16m;" in the ',
                ngx.config.subsystem or "http",
                " block makes one write per key per interval"
            )
        end
        return false
    end
    local now = ngx.now()
    if self.stage_tried and now - self.stage_tried < STAGE_RETRY then
        return false
    end
    self.stage_tried = now
    local l = lib
    local h = l.resty_counter_stage_attach(
        self.handle,
        zone[1],
        zone_name,
        #zone_name,
        self.stage_bytes or 0,
        attach_out
    )
    if h == nil then
        local code = attach_out.code
        local again = attach_out.transient == 1
        -- A transient failure is logged from the second on: the first is
        -- usually workers that started together waiting for each other.
        self.stage_fails = (self.stage_fails or 0) + 1
        if not self.stage_warned and (not again or self.stage_fails > 1) then
            self.stage_warned = true
            mode_notice(
                self,
                ngx.WARN,
                'no shared stage in zone "',
                zone_name,
                '" (',
                strerror(code),
                "): this worker writes its counts into the dict directly",
                again and " until it can attach (tried again at later syncs)"
                    or ""
            )
        end
        if not again then
            self.stage = false
        end
        return false
    end
    self.stage = ffi.gc(h, function(p)
        l.resty_counter_stage_free(p)
    end)
    -- The slot refs this handle gave (key -> ref; resty.counter.sync).
    self.refs, self.nrefs = {}, 0
    local r = l.resty_counter_stage_info(h, info_out) == 0 and info_out
    mode_notice(
        self,
        ngx.NOTICE,
        workers,
        ' workers share a stage in zone "',
        zone_name,
        '" (',
        r and tonumber(r.slots) or "?",
        " slots)",
        self.stage_warned and " now" or ""
    )
    if r and r.orphans_lost_events > 0 then
        ngx.log(
            ngx.ERR,
            'resty.counter: stage zone "',
            zone_name,
            '": ',
            tonumber(r.orphans_lost_events),
            " staged deltas (sum ",
            tonumber(r.orphans_lost_amount),
            ") were lost with regions whose workers were all killed,",
            " reclaimed to make room"
        )
    end
    return self.stage
end

-- Leaves the stage for good (worker exit): unregisters this worker and
-- gives the fold lease up. Later syncs of this worker write directly.
local function leave_stage(self)
    local st = self.stage
    if st then
        self.stage = false
        self.refs, self.nrefs = nil, 0
        ffi.gc(st, nil)
        lib.resty_counter_stage_free(st)
    end
end

-- Says once per worker and dict that the stage's region is full: what does
-- not fit is written directly, exactly; stats().stage_full counts it.
local function full_once(self)
    if self.full_logged then
        return
    end
    self.full_logged = true
    mode_notice(
        self,
        ngx.WARN,
        "the shared stage is full: keys that do not fit are written into",
        " the dict directly (see stats().stage_full); a larger stage zone,",
        " or opts.stage_bytes, stages them"
    )
end

_M.stage_of, _M.leave_stage, _M.full_once = stage_of, leave_stage, full_once

return _M
