//! The Lua scripts of coordination (see `coordination`), and how one group's calls of a
//! script are sent: `EVALSHA` per SN, in one pipeline.

use super::Command;
use ::redis;
use std::sync::OnceLock;

// A lease holds its token, or `q` and its token while its fetch is queued (a token is hex
// digits and a colon, so it never starts with `q`). A claim that is not queued takes a
// queued lease over; the holder's `START` then finds it gone and waits for the new holder.

/// `SET lease token NX PX ttl` (`q..token` when queued, `ARGV[4]` being `1`), and the SN's
/// fence token (empty if none): `{1, fence}` won, `{3, fence}` won by taking a queued lease
/// over, `{0, fence}` lost; asked only if absent (`ARGV[3]` is `1`) and the entry is there,
/// `{2, ''}`.
const CLAIM: &str = r"
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return {2, ''} end
local mine = ARGV[1]
if ARGV[4] == '1' then mine = 'q' .. ARGV[1] end
local fence = redis.call('GET', KEYS[2]) or ''
if redis.call('SET', KEYS[1], mine, 'NX', 'PX', ARGV[2]) then return {1, fence} end
if ARGV[4] ~= '1' and string.sub(redis.call('GET', KEYS[1]) or '', 1, 1) == 'q' then
  redis.call('SET', KEYS[1], mine, 'PX', ARGV[2])
  return {3, fence}
end
return {0, fence}
";

/// Starts a queued lease's fetch (it holds the token alone from now on, its TTL renewed) if
/// it is still this token's: 1; already started: 1; else (taken over, or gone) 0.
const START: &str = r"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return 1 end
if held == 'q' .. ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Extends the lease if it is still this token's (queued or not): 1, else 0.
const RENEW: &str = r"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] or held == 'q' .. ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes the lease if it is still this token's (queued or not).
const RELEASE: &str = r"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] or held == 'q' .. ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Releases the lease (if this token's), then writes the entry unless the fence changed
/// since the claim (1) or the stored entry was fetched later (2: its `dp1±<13-digit ms>`
/// header says so); 0 when written.
const SET_FENCED: &str = r"
if ARGV[4] ~= '' then
  local held = redis.call('GET', KEYS[3])
  if held == ARGV[4] or held == 'q' .. ARGV[4] then redis.call('DEL', KEYS[3]) end
end
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 1 end
local old = redis.call('GET', KEYS[1])
if old and string.sub(old, 1, 3) == 'dp1' then
  local stored = tonumber(string.sub(old, 5, 17))
  local mine = tonumber(string.sub(ARGV[2], 5, 17))
  if stored and mine and stored > mine then return 2 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 0
";

/// Sets a new fence token and deletes the entry; the number of entries deleted.
const FENCE: &str = r"
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return redis.call('DEL', KEYS[1])
";

/// A Lua script and its SHA1, known once a node has loaded it.
pub(super) struct Script {
    pub(super) source: &'static str,
    pub(super) sha: OnceLock<String>,
}

impl Script {
    const fn new(source: &'static str) -> Self {
        Self {
            source,
            sha: OnceLock::new(),
        }
    }
}

/// The scripts of coordination.
pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) start: Script,
    pub(super) renew: Script,
    pub(super) release: Script,
    pub(super) set_fenced: Script,
    pub(super) fence: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            claim: Script::new(CLAIM),
            start: Script::new(START),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            set_fenced: Script::new(SET_FENCED),
            fence: Script::new(FENCE),
        }
    }
}

/// One script call's keys (each in the SN's slot) and arguments.
pub(super) struct Call {
    pub(super) keys: Vec<Vec<u8>>,
    pub(super) args: Vec<Vec<u8>>,
}

/// `EVALSHA sha <keys> <keys…> <args…>` per call, as one pipeline.
pub(super) fn pipeline(sha: &str, calls: &[Call]) -> Command {
    let mut pipe = redis::pipe();
    for call in calls {
        let cmd = pipe.cmd("EVALSHA").arg(sha).arg(call.keys.len());
        for key in &call.keys {
            cmd.arg(&key[..]);
        }
        for arg in &call.args {
            cmd.arg(&arg[..]);
        }
    }
    Command::Pipeline(pipe)
}
