-- resty.counter.loader: finds, checks and loads the native library.
--
-- A candidate is read whole and its bytes checked as an ELF file before
-- anything loads them: the system loader maps segments that lie past the
-- end of a truncated file and the worker dies with SIGBUS, which pcall
-- cannot catch. The checked bytes are then loaded from a private copy,
-- never from the installed file: an installer that writes over that file
-- in place (`cp`, some package managers) would otherwise change the pages
-- a running worker executes, and it would die at its next call (SIGBUS or
-- SIGSEGV). The copy is a memfd (memfd_create, loaded through
-- /proc/self/fd/N): no directory the worker user must be able to write,
-- nothing that a noexec /tmp refuses, nothing left behind if the worker
-- dies. Without memfd_create (a kernel or a seccomp policy that refuses
-- it), a temporary file from os.tmpname, unlinked once loaded; without
-- either, the library is refused with both reasons. Each worker holds its
-- own copy (the library's size, about 0.5 MB, per worker and subsystem).
-- After loading, the library must implement the shim's ABI number and
-- carry the shim's release, so a shim and a library of two releases never
-- run together (a reload that finds a new library, or an old one, says so).

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

-- Whether `bytes` (a whole file) are an ELF shared object for this
-- platform whose headers and segments lie inside them: nil and why not,
-- or true.
function _M.check_elf(bytes)
    local size = #bytes
    local h = bytes:sub(1, HEADER_BYTES)
    if #h < 4 or h:sub(1, 4) ~= "\127ELF" then
        return nil, size == 0 and "empty file (0 bytes)" or "not an ELF file"
    end
    local is64 = h:byte(5) == 2
    if (h:byte(5) ~= 1 and not is64) or is64 ~= ffi.abi("64bit") then
        return nil, "ELF class " .. h:byte(5) .. " is not this platform's"
    end
    local le = h:byte(6) == 1
    if le ~= ffi.abi("le") then
        return nil, "byte order is not this platform's"
    end
    if #h < (is64 and 64 or 52) then
        return nil, "ELF header cut short (" .. size .. " bytes)"
    end
    if uint(h, 17, 2, le) ~= 3 then -- e_type ET_DYN
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
        return nil, "program headers end past the file's " .. size .. " bytes"
    end
    if shoff ~= 0 and shoff + shnum * shentsize > size then
        return nil, "section headers end past the file's " .. size .. " bytes"
    end
    for i = 0, phnum - 1 do
        local base = phoff + i * phentsize + 1
        local off, filesz
        if is64 then -- p_type p_flags p_offset p_vaddr p_paddr p_filesz
            off, filesz =
                uint(bytes, base + 8, 8, le), uint(bytes, base + 32, 8, le)
        else -- p_type p_offset p_vaddr p_paddr p_filesz
            off, filesz =
                uint(bytes, base + 4, 4, le), uint(bytes, base + 16, 4, le)
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

---------------------------------------------------------------------------
-- The private copy
---------------------------------------------------------------------------
local MFD_CLOEXEC, MFD_EXEC = 1, 0x10 -- MFD_EXEC: Linux 6.3 and later
local EINTR, EINVAL = 4, 22

-- Each prototype on its own: one another module declared differently
-- must not keep the others from being declared.
for _, proto in ipairs({
    "int memfd_create(const char *name, unsigned int flags);",
    "ssize_t write(int fd, const void *buf, size_t count);",
    "int close(int fd);",
    "char *strerror(int errnum);",
}) do
    pcall(ffi.cdef, proto)
end

local function errno_text(what)
    local e = ffi.errno()
    local ok, msg = pcall(function()
        return ffi.string(ffi.C.strerror(e))
    end)
    return what .. ": " .. (ok and msg or "errno " .. e)
end

-- Writes all of `bytes` to `fd`: true, or nil and why not.
local function write_all(fd, bytes)
    local p, left = ffi.cast("const char *", bytes), #bytes
    while left > 0 do
        local n = tonumber(ffi.C.write(fd, p, left))
        if n < 0 and ffi.errno() ~= EINTR then
            return nil, errno_text("write")
        elseif n > 0 then
            p, left = p + n, left - n
        end
    end
    return true
end

-- `bytes` loaded from a memfd: the library, or nil, why not, and whether
-- the copy was made (then the system loader refused it). The fd is closed
-- once loaded (the mapping keeps the memory). Another load in this
-- process that gets the same fd number names the same path, and the
-- system loader answers with the copy it already has.
local function from_memfd(bytes)
    local ok, fd = pcall(function()
        local C = ffi.C
        local f = C.memfd_create("libresty_counter.so", MFD_CLOEXEC + MFD_EXEC)
        if f < 0 and ffi.errno() == EINVAL then -- a kernel before MFD_EXEC
            f = C.memfd_create("libresty_counter.so", MFD_CLOEXEC)
        end
        return f
    end)
    if not ok then
        return nil, "memfd_create: " .. tostring(fd), false
    elseif fd < 0 then
        return nil, errno_text("memfd_create"), false
    end
    local made, err = write_all(fd, bytes)
    local loaded, l = false, nil
    if made then
        loaded, l = pcall(ffi.load, "/proc/self/fd/" .. fd)
        err = not loaded and "memfd: " .. tostring(l)
    end
    ffi.C.close(fd)
    return loaded and l or nil, err, made
end

-- `bytes` loaded from a temporary file, removed once loaded: the library,
-- or nil, why not, and whether the copy was made.
local function from_tmpfile(bytes)
    local ok, name = pcall(os.tmpname)
    if not ok then
        return nil, "temporary file: " .. tostring(name), false
    end
    local made, loaded, l = false, false, nil
    local f, err = io.open(name, "wb")
    if f then
        made, err = f:write(bytes)
        made = f:close() and made
        if made then
            loaded, l = pcall(ffi.load, name)
            err = not loaded and tostring(l)
        end
    end
    os.remove(name)
    if not loaded then
        return nil, "temporary file: " .. tostring(err), made
    end
    return l
end

-- A private copy of `bytes`, loaded: the library, or nil, why not, and
-- whether no copy could be made at all.
local function load_private(bytes)
    local l, memfd_err, memfd_made = from_memfd(bytes)
    if l then
        return l
    end
    local tmp_err, tmp_made
    l, tmp_err, tmp_made = from_tmpfile(bytes)
    if l then
        return l
    end
    return nil, memfd_err .. "; " .. tmp_err, not (memfd_made or tmp_made)
end

local function try(path, want)
    local f = io.open(path, "rb")
    if not f then
        return nil
    end
    local bytes = f:read("*a")
    f:close()
    if not bytes then
        return nil, "cannot read it"
    end
    local whole, damage = _M.check_elf(bytes)
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
    local l, why, no_copy = load_private(bytes)
    if not l and not no_copy then
        return nil, why -- the system loader refused the bytes
    elseif not l then
        return nil,
            {
                fatal = "resty.counter: cannot make a private copy of "
                    .. path
                    .. " to load ("
                    .. why
                    .. ")",
            }
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
--          shim = "<the shim's path>" }. Returns the library and the path
-- whose bytes it runs (also left in _M.path: a worker's maps show only
-- the private copy), or nil, err.
function _M.load(cpath, want)
    local tried = {}
    for template in cpath:gmatch("[^;]+") do
        if template:find("?", 1, true) then
            local path = template:gsub("%?", want.name)
            local found, why = try(path, want)
            if found then
                _M.path = path
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
