-- resty.counter.loader: finds, checks and loads the native library.
--
-- A candidate is read and checked as an ELF file before ffi.load sees it:
-- the system loader maps segments that lie past the end of a truncated
-- file and the worker dies with SIGBUS, which pcall cannot catch. After
-- loading, the library must implement the shim's ABI number and carry the
-- shim's release, so a shim and a library of two releases never run
-- together (a reload that finds a new library, or an old one, says so).

local ffi = require("ffi")

local _M = {}

local HEADER_BYTES = 64 -- the ELF64 header; ELF32 needs 52

-- An unsigned integer of `n` bytes at 1-based `at` in `s`.
local function uint(s, at, n, le)
    local v = 0
    for i = 0, n - 1 do
        local b = le and s:byte(at + n - 1 - i) or s:byte(at + i)
        v = v * 256 + b
    end
    return v
end

-- Whether the file at `path` is a whole ELF shared object for this
-- platform: nil and why not, or true. Reads the headers only.
function _M.check_elf(path)
    local f, err = io.open(path, "rb")
    if not f then
        return nil, err
    end
    local size = f:seek("end")
    f:seek("set", 0)
    local h = f:read(HEADER_BYTES) or ""
    if #h < 4 or h:sub(1, 4) ~= "\127ELF" then
        f:close()
        return nil, size == 0 and "empty file (0 bytes)" or "not an ELF file"
    end
    local is64 = h:byte(5) == 2
    if (h:byte(5) ~= 1 and not is64) or is64 ~= ffi.abi("64bit") then
        f:close()
        return nil, "ELF class " .. h:byte(5) .. " is not this platform's"
    end
    local le = h:byte(6) == 1
    if le ~= ffi.abi("le") then
        f:close()
        return nil, "byte order is not this platform's"
    end
    if #h < (is64 and 64 or 52) then
        f:close()
        return nil, "ELF header cut short (" .. size .. " bytes)"
    end
    if uint(h, 17, 2, le) ~= 3 then -- e_type ET_DYN
        f:close()
        return nil,
            "not a shared object (ELF type " .. uint(h, 17, 2, le) .. ")"
    end
    local w = is64 and 8 or 4
    local phoff = uint(h, 25 + w, w, le)
    local shoff = uint(h, 25 + 2 * w, w, le)
    local at = 25 + 3 * w + 4 + 2 -- e_flags, e_ehsize
    local phentsize, phnum = uint(h, at, 2, le), uint(h, at + 2, 2, le)
    local shentsize, shnum = uint(h, at + 4, 2, le), uint(h, at + 6, 2, le)
    if phoff + phnum * phentsize > size then
        f:close()
        return nil, "program headers end past the file's " .. size .. " bytes"
    end
    if shoff ~= 0 and shoff + shnum * shentsize > size then
        f:close()
        return nil, "section headers end past the file's " .. size .. " bytes"
    end
    f:seek("set", phoff)
    local ph = f:read(phnum * phentsize) or ""
    f:close()
    if #ph < phnum * phentsize then
        return nil, "program headers cut short"
    end
    for i = 0, phnum - 1 do
        local base = i * phentsize + 1
        local off, filesz
        if is64 then -- p_type p_flags p_offset p_vaddr p_paddr p_filesz
            off, filesz = uint(ph, base + 8, 8, le), uint(ph, base + 32, 8, le)
        else -- p_type p_offset p_vaddr p_paddr p_filesz
            off, filesz = uint(ph, base + 4, 4, le), uint(ph, base + 16, 4, le)
        end
        if off + filesz > size then
            return nil,
                "segment "
                    .. i
                    .. " ends at byte "
                    .. off + filesz
                    .. ", past the file's "
                    .. size
                    .. " bytes"
        end
    end
    return true
end

-- Loads one candidate: the library, or nil and why not. `why` is nil when
-- there is no file (the search goes on), a string when the file cannot be
-- used (the search goes on), or a table {fatal = message} (it stops).
local function try(path, want)
    local f = io.open(path, "rb")
    if not f then
        return nil
    end
    f:close()
    local whole, damage = _M.check_elf(path)
    if not whole then
        return nil,
            {
                fatal = "resty.counter: truncated or damaged library "
                    .. path
                    .. ": "
                    .. damage
                    .. "; reinstall it (copy to"
                    .. " a temporary name, then rename) and restart nginx",
            }
    end
    local ok, l = pcall(ffi.load, path)
    if not ok then
        return nil, tostring(l)
    end
    local has, abi = pcall(function()
        return l.resty_counter_abi_version()
    end)
    if not has then
        return nil, "not resty.counter's library"
    end
    abi = tonumber(abi)
    local hv, v = pcall(function()
        return ffi.string(l.resty_counter_version())
    end)
    local version = hv and v or "older than 0.3.0"
    if abi ~= want.abi or version ~= want.version then
        return nil,
            {
                fatal = "resty.counter: "
                    .. path
                    .. " is version "
                    .. version
                    .. " (ABI "
                    .. abi
                    .. "), but the shim "
                    .. want.shim
                    .. " is version "
                    .. want.version
                    .. " (ABI "
                    .. want.abi
                    .. "): install the shim and"
                    .. " the library of one release, then restart nginx",
            }
    end
    return l
end

-- Finds the library through `cpath`, the one mechanism, so a source tree
-- (target/release/?.so) and a LuaRocks tree work the same way.
-- want = { name = "libresty_counter", abi = n, version = "x.y.z",
--          shim = "<the shim's path>" }. Returns the library or nil, err.
function _M.load(cpath, want)
    local tried = {}
    for template in cpath:gmatch("[^;]+") do
        if template:find("?", 1, true) then
            local path = template:gsub("%?", want.name)
            local found, why = try(path, want)
            if found then
                return found, path
            end
            if type(why) == "table" then
                return nil, why.fatal
            end
            tried[#tried + 1] = why and path .. " (" .. why .. ")" or path
        end
    end
    return nil,
        "resty.counter: cannot find "
            .. want.name
            .. ".so in "
            .. "package.cpath; tried:\n    "
            .. table.concat(tried, "\n    ")
end

return _M
