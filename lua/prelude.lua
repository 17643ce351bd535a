-- prelude: the tables every strategy file fills (S) and uses (U). Sent first.
-- Integer division helpers stay exact for operands below 2^53, where a plain
-- math.floor(a / b) can round the wrong way.
local S = {}
local U = {}

function U.floor_div(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

function U.ceil_div(a, b)
  local q = U.floor_div(a, b)
  if q * b < a then
    q = q + 1
  end
  return q
end
