//! Tokens that are not ours to renew: Vault Agent's sink file and the Vault Proxy's own
//! token. Neither is renewed or revoked here; each is looked at again, more often as it
//! nears its end, so that its replacement is seen before the old token ends.

use std::path::Path;
use std::time::{Duration, Instant};

use super::files::{TOKEN_FILE_POLL, read_sink_token, wait_for_token_file};
use super::token::{
    LookupSelf, TokenInfo, TokenManager, TokenState, lookup_info, lookup_self, state,
};
use crate::error::{ErrorKind, Result};
use crate::vault::{Call, Client};

/// The longest wait before a token file is read again to see whether the Agent
/// replaced it (sooner as the token nears its end: see [`next_look`]).
const TOKEN_FILE_CHECK: Duration = Duration::from_secs(1);
/// The longest wait before the Proxy's token is looked up again.
const PROXY_CHECK: Duration = Duration::from_secs(30);

impl TokenManager {
    /// Vault Agent's sink: the token in `path`, looked up when it is new or when its
    /// last look is two thirds old (the Agent renews it); never renewed here.
    pub(super) async fn read_token_file(
        &self,
        client: &Client,
        path: &Path,
        wait: Duration,
        old: Option<&TokenState>,
    ) -> Result<TokenState> {
        if !self
            .waited_for_file
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // The first read only: the Agent may not have written the sink yet.
            wait_for_token_file(path, wait).await?;
        }
        let token = read_sink_token(path)?;
        let now = Instant::now();
        if let Some(s) = old.filter(|s| s.same_token(&token))
            && s.info.renew_at().is_none_or(|at| now < at)
            && s.info.expires_at().is_none_or(|end| now < end)
        {
            return Ok(s.with_refresh_at(Some(next_look(now, TOKEN_FILE_CHECK, &s.info))));
        }
        let mut info = lookup_self(client, &token).await.map_err(|e| {
            e.context(format!(
                "checking the token in {} (Vault Agent's sink)",
                path.display()
            ))
        })?;
        if let Some(o) = old.filter(|o| o.same_token(&token)) {
            // The same token looked up again: the same name; and a 0 TTL after a finite
            // one is its last second (without an expire_time to say so), not "never".
            info.accessor.clone_from(&o.info.accessor);
            if info.ttl.is_zero() && !o.info.ttl.is_zero() {
                info.ttl = Duration::from_millis(1);
            }
        } else {
            self.name_unnamed(&mut info);
        }
        let mut s = state(Some(token), info, None);
        s.refresh_at = Some(next_look(now, TOKEN_FILE_CHECK, &s.info));
        Ok(s)
    }
}

/// Behind a Vault Proxy: no token of ours; the Proxy's is looked up (through it) to
/// learn which token it is and its TTL, again more often as it nears its end (see
/// [`next_look`]), so that a replaced token is seen before the old one ends.
pub(super) async fn look_behind_proxy(client: &Client) -> Result<TokenState> {
    let (env, received) = client
        .call::<LookupSelf>(Call::get("auth/token/lookup-self").unauthenticated())
        .await
        .map_err(|e| {
            let hint = if e.kind() == ErrorKind::PermissionDenied {
                "; is the Proxy's `use_auto_auth_token` on, and its auto-auth logged in?"
            } else {
                ""
            };
            e.context(format!(
                "looking up the Vault Proxy's token (no token of our own){hint}"
            ))
        })?;
    let info = lookup_info(env.into_data("auth/token/lookup-self")?.0, received)?;
    let mut s = state(None, info, None);
    s.refresh_at = Some(next_look(received, PROXY_CHECK, &s.info));
    Ok(s)
}

/// The next look at a token that is not ours to renew (the Agent's or the Proxy's):
/// after a tenth of what is left of it as last seen, between 100 ms and `longest`.
/// Whoever owns it replaces it shortly before its end (Vault's lifetime watcher keeps a
/// grace of 10-20 % of its TTL), so the looks get denser as that moment nears, and the
/// replacement is seen well before the old token ends; a token far from its end is
/// looked at rarely.
fn next_look(now: Instant, longest: Duration, info: &TokenInfo) -> Instant {
    let every = info
        .expires_at()
        .map_or(longest, |end| end.saturating_duration_since(now) / 10)
        .clamp(TOKEN_FILE_POLL, longest);
    now + every
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_at_a_token_not_ours_get_denser_near_its_end_but_never_busy() {
        let now = Instant::now();
        let mut info = TokenInfo {
            accessor: "a".into(),
            ttl: Duration::from_secs(3600),
            renewable: true,
            policies: vec![],
            obtained_at: now,
            logins: 0,
            renewals: 0,
        };
        let wait = |info: &TokenInfo, longest| next_look(now, longest, info) - now;
        // An hour left: the longest wait (30 s for the Proxy, 1 s for a file).
        assert_eq!(wait(&info, PROXY_CHECK), PROXY_CHECK);
        assert_eq!(wait(&info, TOKEN_FILE_CHECK), TOKEN_FILE_CHECK);
        // 60 s left: every 6 s; 2 s left: every 200 ms.
        info.ttl = Duration::from_secs(60);
        assert_eq!(wait(&info, PROXY_CHECK), Duration::from_secs(6));
        info.ttl = Duration::from_secs(2);
        assert_eq!(wait(&info, PROXY_CHECK), Duration::from_millis(200));
        // Past its end, or no end: never "now" (a busy loop), never more than the longest.
        info.obtained_at = now - Duration::from_secs(10);
        assert_eq!(wait(&info, PROXY_CHECK), TOKEN_FILE_POLL);
        info.ttl = Duration::ZERO;
        assert_eq!(wait(&info, PROXY_CHECK), PROXY_CHECK);
    }
}
