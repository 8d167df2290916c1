-- A batch's answers (claim.lua, complete.lua; this file is put in front of each, after
-- record.lua): one string for the whole batch, not a table per id, which the client reads in one
-- piece instead of parsing a small array per id (docs/arbiter.md, "Replies"). Per id, in order:
--   <code><flag><attempts>,<n>:<extra>
-- code and flag one character each, attempts decimal digits (possibly none), extra n bytes of
-- anything (free text included). Code '0' is that id's own error, with the message as extra.

-- Lengths as text, made once per length per call (formatting a number costs a format each).
local lengths = {}

local function entry(code, flag, attempts, extra)
  local n = #extra
  local len = lengths[n]
  if not len then
    len = tostring(n)
    lengths[n] = len
  end
  return code .. flag .. attempts .. ',' .. len .. ':' .. extra
end

-- Runs `step(key, ...)` for each id, with its `per` arguments from ARGV[first] on, and returns
-- the batch's answer. An error (a foreign key of the wrong type under the prefix) is that id's
-- answer alone: the other ids are answered as if each had had its own call.
local function each_id(first, per, step)
  local out = {}
  for i = 1, #KEYS do
    local a = first + per * (i - 1)
    local ok, answer = pcall(step, KEYS[i], unpack(ARGV, a, a + per - 1))
    if not ok then
      answer = entry('0', '0', '', type(answer) == 'table' and answer.err or tostring(answer))
    end
    out[i] = answer
  end
  return table.concat(out)
end
