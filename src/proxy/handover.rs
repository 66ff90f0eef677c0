//! The hand-over: a session idle after a rotation moves to a server connection of the
//! serving generation, so its old lease can go. Its settings (`SET`, startup parameters)
//! and prepared statements (protocol-level) are read from the old connection and replayed
//! on the new one, and so is its unnamed statement (kept by the tracker). Refused — the
//! session then stays, untouched, on its old connection — when it holds what cannot
//! move: `LISTEN`, an open cursor, an advisory lock, a temporary table, a changed role,
//! a SQL `PREPARE`.

use std::time::Duration;

use super::route::{CheckoutError, Route};
use super::server::{LoginError, Server, quote_literal};

/// How long reading a session's state from its old connection may take.
const READ_STATE_WITHIN: Duration = Duration::from_secs(5);

/// How long moving may take (a login, replaying the state).
const HAND_OVER_WITHIN: Duration = Duration::from_secs(10);

/// What a hand-over did.
pub(crate) enum Moved {
    /// The session now runs on this connection (of the serving generation).
    To(Server),
    /// The session stays on its connection, as it was (why).
    Stay(String),
    /// The old connection failed while the proxy used it: the session ends.
    Broken(String),
}

/// Move an idle session from `old` to a connection of the serving generation.
/// `unnamed`: the Parse body of its unnamed statement, if it has one.
pub(crate) async fn hand_over(route: &Route, old: &mut Server, unnamed: Option<&[u8]>) -> Moved {
    let why = match move_state(route, old, unnamed).await {
        Moved::Stay(why) => why,
        other => return other,
    };
    // It stays. The proxy's queries ended its unnamed statement there (any simple query
    // does): parse it again, so the client can still bind it.
    let Some(body) = unnamed else {
        return Moved::Stay(why);
    };
    match tokio::time::timeout(READ_STATE_WITHIN, old.parse_raw(body)).await {
        Ok(Ok(())) => Moved::Stay(why),
        Ok(Err(LoginError::Server { message, .. })) => {
            // The connection is fine; the statement no longer parses (its table gone,
            // say): the client's next Bind of it fails, as it would have there anyway.
            tracing::warn!(database = %route.name, error = %message, "the unnamed statement of a session that stays could not be parsed again");
            Moved::Stay(why)
        }
        Ok(Err(e)) => Moved::Broken(format!("parsing its unnamed statement again: {e}")),
        Err(_) => Moved::Broken(format!(
            "parsing its unnamed statement again took over {READ_STATE_WITHIN:?}"
        )),
    }
}

/// Read the state, then open a new connection and replay it there.
async fn move_state(route: &Route, old: &mut Server, unnamed: Option<&[u8]>) -> Moved {
    // 1. Read the session's state from the old connection. A failure here leaves that
    //    connection in doubt: the session ends.
    let state = match tokio::time::timeout(READ_STATE_WITHIN, read_state(old)).await {
        Ok(Ok(Ok(state))) => state,
        Ok(Ok(Err(why))) => return Moved::Stay(why),
        Ok(Err(e)) => return Moved::Broken(e.to_string()),
        Err(_) => {
            return Moved::Broken(format!("reading its state took over {READ_STATE_WITHIN:?}"));
        }
    };
    // 2. A new connection with that state. A failure here leaves the old connection as it
    //    was: the session stays on it.
    let replay = async {
        let mut new = match route.connection().await {
            Ok(server) => server,
            Err(CheckoutError::Login(e)) => return Err(e.to_string()),
            Err(CheckoutError::Credentials(e)) => return Err(e.to_string()),
            Err(CheckoutError::Timeout) => return Err("no connection".into()),
        };
        let text = |e: LoginError| e.to_string();
        new.set_config(&state.settings).await.map_err(text)?;
        if !state.prepared.is_empty() {
            new.prepare(&state.prepared).await.map_err(text)?;
        }
        if let Some(body) = unnamed {
            new.parse_raw(body).await.map_err(text)?;
        }
        Ok(new)
    };
    match tokio::time::timeout(HAND_OVER_WITHIN, replay).await {
        Ok(Ok(new)) => Moved::To(new),
        Ok(Err(why)) => Moved::Stay(why),
        Err(_) => Moved::Stay(format!(
            "the new connection was not ready within {HAND_OVER_WITHIN:?}"
        )),
    }
}

/// A session's state as the server knows it.
struct State {
    settings: Vec<(String, String)>,
    prepared: Vec<(String, String, Vec<u32>)>,
}

/// Read what a hand-over carries; `Ok(Err(why))` when the session holds what cannot
/// move. Catalogs are named with their schema: a client's own `pg_settings` view earlier
/// on its search_path must not answer.
async fn read_state(old: &mut Server) -> Result<Result<State, String>, LoginError> {
    // What cannot move: LISTEN, cursors, advisory locks, temporary objects, a changed
    // role or session user, SQL-level PREPAREs (their text may hold other statements),
    // more prepared statements than a hand-over should carry.
    let blockers = old
        .rows(&format!(
            "SELECT (SELECT count(*) FROM pg_catalog.pg_listening_channels()) \
             + (SELECT count(*) FROM pg_catalog.pg_cursors) \
             + (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
                AND pid = pg_catalog.pg_backend_pid()) \
             + (CASE WHEN pg_catalog.pg_my_temp_schema() = 0 THEN 0 ELSE 1 END) \
             + (CASE WHEN pg_catalog.current_setting('role') = 'none' \
                AND current_user = session_user AND session_user::text = {} \
                THEN 0 ELSE 1 END) \
             + (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
             + (SELECT CASE WHEN count(*) > 1000 \
                OR coalesce(sum(length(statement)), 0) > 1048576 \
                THEN 1 ELSE 0 END FROM pg_catalog.pg_prepared_statements)",
            quote_literal(&old.user)
        ))
        .await?;
    if blockers
        .first()
        .and_then(|r| r.first())
        .cloned()
        .flatten()
        .as_deref()
        != Some("0")
    {
        return Ok(Err(
            "it holds state that cannot move (LISTEN, a cursor, an advisory lock, a temporary \
             table, SET ROLE or SESSION AUTHORIZATION, a SQL PREPARE, or over 1,000 prepared \
             statements)"
                .into(),
        ));
    }
    let settings = old
        .rows(
            "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
             WHERE source IN ('session', 'client') AND name NOT LIKE 'transaction%'",
        )
        .await?
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Some(name), Some(value)] => Some((name.clone(), value.clone())),
            _ => None,
        })
        .collect();
    let mut prepared = Vec::new();
    for row in old
        .rows(
            "SELECT name, statement, parameter_types::pg_catalog.oid[]::text \
             FROM pg_catalog.pg_prepared_statements",
        )
        .await?
    {
        if let [Some(name), Some(statement), Some(types)] = row.as_slice() {
            let oids = types
                .trim_matches(['{', '}'])
                .split(',')
                .filter(|t| !t.is_empty())
                .map(|t| t.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>();
            match oids {
                Ok(oids) => prepared.push((name.clone(), statement.clone(), oids)),
                Err(_) => return Ok(Err(format!("parameter types {types:?} unreadable"))),
            }
        }
    }
    Ok(Ok(State { settings, prepared }))
}
