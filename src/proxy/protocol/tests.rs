//! The tracker's tables: each row a sequence of messages both ways and what the tracker
//! must say after it — fed whole, byte by byte, and cut in two at every byte of every
//! step.

use super::tracker::{Forward, MAX_UNNAMED_PARSE, Opaque, Tracker, Why};

/// Bytes one way.
#[derive(Debug, Clone)]
enum Step {
    /// Client → server.
    C(Vec<u8>),
    /// Server → client.
    S(Vec<u8>),
}
use Step::{C, S};

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

// Client messages.
fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &[sql.as_bytes(), b"\0"].concat())
}
fn parse_body(name: &str, sql: &str) -> Vec<u8> {
    [name.as_bytes(), b"\0", sql.as_bytes(), b"\0", &[0, 0]].concat()
}
fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(b'P', &parse_body(name, sql))
}
fn bind() -> Vec<u8> {
    msg(b'B', b"\0\0\0\0\0\0\0\0")
}
fn describe() -> Vec<u8> {
    msg(b'D', b"P\0")
}
fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}
fn sync() -> Vec<u8> {
    msg(b'S', b"")
}
fn flush() -> Vec<u8> {
    msg(b'H', b"")
}
fn close_statement(name: &str) -> Vec<u8> {
    msg(b'C', &[b"S", name.as_bytes(), b"\0"].concat())
}
fn copy_data(data: &str) -> Vec<u8> {
    msg(b'd', data.as_bytes())
}
fn copy_done() -> Vec<u8> {
    msg(b'c', b"")
}
fn copy_fail() -> Vec<u8> {
    msg(b'f', b"stop\0")
}
fn function_call() -> Vec<u8> {
    msg(b'F', &[0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0])
}
/// Parse, Bind, Describe, Execute, Sync of `sql` (the unnamed statement).
fn extended(sql: &str) -> Vec<u8> {
    cat(&[parse("", sql), bind(), describe(), execute(), sync()])
}

// Server messages.
fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}
fn parse_complete() -> Vec<u8> {
    msg(b'1', b"")
}
fn bind_complete() -> Vec<u8> {
    msg(b'2', b"")
}
fn close_complete() -> Vec<u8> {
    msg(b'3', b"")
}
fn row_description() -> Vec<u8> {
    msg(b'T', &[0, 0])
}
fn no_data() -> Vec<u8> {
    msg(b'n', b"")
}
fn parameter_description() -> Vec<u8> {
    msg(b't', &[0, 0])
}
fn data_row() -> Vec<u8> {
    msg(b'D', &[0, 1, 0, 0, 0, 1, b'1'])
}
fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &[tag.as_bytes(), b"\0"].concat())
}
fn error() -> Vec<u8> {
    msg(b'E', b"SERROR\0C42601\0Msyntax error\0\0")
}
fn notice() -> Vec<u8> {
    msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0")
}
fn parameter_status() -> Vec<u8> {
    msg(b'S', b"TimeZone\0UTC\0")
}
fn notification() -> Vec<u8> {
    msg(b'A', b"\0\0\0\x07news\0hi\0")
}
fn copy_in_response() -> Vec<u8> {
    msg(b'G', &[0, 0, 0])
}
fn copy_out_response() -> Vec<u8> {
    msg(b'H', &[0, 0, 0])
}
fn server_copy_data() -> Vec<u8> {
    msg(b'd', b"1\n")
}
fn server_copy_done() -> Vec<u8> {
    msg(b'c', b"")
}
fn function_result() -> Vec<u8> {
    msg(b'V', &[0, 0, 0, 1, b'1'])
}
fn portal_suspended() -> Vec<u8> {
    msg(b's', b"")
}
fn empty_query() -> Vec<u8> {
    msg(b'I', b"")
}
/// The replies to `extended(...)` of a statement returning one row.
fn extended_answered(status: u8) -> Vec<u8> {
    cat(&[
        parse_complete(),
        bind_complete(),
        row_description(),
        data_row(),
        complete("SELECT 1"),
        ready(status),
    ])
}
/// The replies to `query(...)` of a statement returning one row.
fn query_answered(status: u8) -> Vec<u8> {
    cat(&[
        row_description(),
        data_row(),
        complete("SELECT 1"),
        ready(status),
    ])
}

/// A row of the table.
struct Row {
    name: &'static str,
    steps: Vec<Step>,
    /// `is_idle()`.
    idle: bool,
    /// `can_move()`.
    can_move: Result<(), Why>,
    /// `unnamed_statement()`: the Parse body kept, if any.
    unnamed: Option<Vec<u8>>,
}

fn row(name: &'static str, steps: Vec<Step>, idle: bool, can_move: Result<(), Why>) -> Row {
    Row {
        name,
        steps,
        idle,
        can_move,
        unnamed: None,
    }
}

fn rows() -> Vec<Row> {
    let big_sql = "x".repeat(MAX_UNNAMED_PARSE);
    vec![
        row("a fresh session", vec![], true, Ok(())),
        row(
            "a simple query sent",
            vec![C(query("SELECT 1"))],
            false,
            Err(Why::Replies(1)),
        ),
        row(
            "a simple query answered",
            vec![C(query("SELECT 1")), S(query_answered(b'I'))],
            true,
            Ok(()),
        ),
        row(
            "notices, parameter changes and notifications between queries",
            vec![S(cat(&[notice(), parameter_status(), notification()]))],
            true,
            Ok(()),
        ),
        row(
            "three pipelined queries, two answered",
            vec![
                C(cat(&[
                    query("SELECT 1"),
                    query("SELECT 2"),
                    query("SELECT 3"),
                ])),
                S(query_answered(b'I')),
                S(query_answered(b'I')),
            ],
            false,
            Err(Why::Replies(1)),
        ),
        row(
            "three pipelined queries answered",
            vec![
                C(cat(&[
                    query("SELECT 1"),
                    query("SELECT 2"),
                    query("SELECT 3"),
                ])),
                S(cat(&[
                    query_answered(b'I'),
                    query_answered(b'I'),
                    query_answered(b'I'),
                ])),
            ],
            true,
            Ok(()),
        ),
        row(
            "a multi-statement query answered statement by statement",
            vec![
                C(query("SELECT 1; SELECT 2")),
                S(cat(&[row_description(), data_row(), complete("SELECT 1")])),
                S(cat(&[row_description(), data_row(), complete("SELECT 1")])),
            ],
            false,
            Err(Why::Replies(1)),
        ),
        row(
            "BEGIN answered",
            vec![C(query("BEGIN")), S(cat(&[complete("BEGIN"), ready(b'T')]))],
            false,
            Err(Why::InTransaction),
        ),
        row(
            "an error inside a transaction",
            vec![
                C(query("BEGIN")),
                S(cat(&[complete("BEGIN"), ready(b'T')])),
                C(query("SELEC 1")),
                S(cat(&[error(), ready(b'E')])),
            ],
            false,
            Err(Why::FailedTransaction),
        ),
        row(
            "an aborted transaction rolled back",
            vec![
                C(query("BEGIN")),
                S(cat(&[complete("BEGIN"), ready(b'T')])),
                C(query("SELEC 1")),
                S(cat(&[error(), ready(b'E')])),
                C(query("ROLLBACK")),
                S(cat(&[complete("ROLLBACK"), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "a failed simple query outside a transaction",
            vec![C(query("SELEC 1")), S(cat(&[error(), ready(b'I')]))],
            true,
            Ok(()),
        ),
        row(
            "extended: Parse, Bind, Describe, Execute, Sync answered",
            vec![C(extended("SELECT 1")), S(extended_answered(b'I'))],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "SELECT 1")),
        row(
            "extended: sent, not answered",
            vec![C(extended("SELECT 1"))],
            false,
            Err(Why::Replies(1)),
        ),
        row(
            "extended: answered up to the Execute, ReadyForQuery to come",
            vec![
                C(extended("SELECT 1")),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    row_description(),
                    data_row(),
                    complete("SELECT 1"),
                ])),
            ],
            false,
            Err(Why::Replies(1)),
        )
        .unnamed(parse_body("", "SELECT 1")),
        row(
            "extended without a Sync: Parse, Describe, Flush answered",
            vec![
                C(cat(&[
                    parse("s1", "SELECT $1"),
                    msg(b'D', b"Ss1\0"),
                    flush(),
                ])),
                S(cat(&[
                    parse_complete(),
                    parameter_description(),
                    row_description(),
                ])),
            ],
            false,
            Err(Why::Unsynced),
        ),
        row(
            "extended without a Sync, then its Sync answered",
            vec![
                C(cat(&[
                    parse("s1", "SELECT $1"),
                    msg(b'D', b"Ss1\0"),
                    flush(),
                ])),
                S(cat(&[
                    parse_complete(),
                    parameter_description(),
                    row_description(),
                ])),
                C(sync()),
                S(ready(b'I')),
            ],
            true,
            Ok(()),
        ),
        row(
            "a Flush alone waits for a Sync",
            vec![C(flush())],
            false,
            Err(Why::Unsynced),
        ),
        row(
            "extended: a row limit suspends the portal",
            vec![
                C(cat(&[parse("", "SELECT 1"), bind(), execute(), sync()])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    data_row(),
                    portal_suspended(),
                    ready(b'I'),
                ])),
            ],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "SELECT 1")),
        row(
            "extended: an empty query",
            vec![
                C(cat(&[parse("", ""), bind(), execute(), sync()])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    empty_query(),
                    ready(b'I'),
                ])),
            ],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "")),
        row(
            "extended: an error skips to the Sync",
            vec![C(extended("SELEC 1")), S(cat(&[error(), ready(b'I')]))],
            true,
            Ok(()),
        ),
        row(
            "extended: a Query before the Sync is skipped after an error (no reply of its own)",
            vec![
                C(cat(&[
                    parse("", "SELEC 1"),
                    bind(),
                    execute(),
                    query("SELECT 2"),
                    sync(),
                ])),
                S(cat(&[error(), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "extended: an error before the client's Sync",
            vec![C(cat(&[parse("", "SELEC 1"), flush()])), S(error())],
            false,
            Err(Why::Unsynced),
        ),
        row(
            "extended: a Query sent after the error came is skipped too",
            vec![
                C(cat(&[parse("", "SELEC 1"), flush()])),
                S(error()),
                C(query("SELECT 2")),
                C(sync()),
                S(ready(b'I')),
            ],
            true,
            Ok(()),
        ),
        row(
            "extended: pipelined, the second batch in a transaction",
            vec![
                C(cat(&[extended("BEGIN"), extended("SELECT 1")])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    no_data(),
                    complete("BEGIN"),
                    ready(b'T'),
                ])),
                S(extended_answered(b'T')),
            ],
            false,
            Err(Why::InTransaction),
        )
        .unnamed(parse_body("", "SELECT 1")),
        row(
            "extended: a failed commit at the Sync",
            vec![
                C(extended("INSERT INTO deferred VALUES (1)")),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    no_data(),
                    complete("INSERT 0 1"),
                    error(),
                    ready(b'I'),
                ])),
            ],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "INSERT INTO deferred VALUES (1)")),
        row(
            "COPY FROM STDIN by a simple query, in progress",
            vec![
                C(query("COPY t FROM STDIN")),
                S(copy_in_response()),
                C(copy_data("1\n")),
            ],
            false,
            Err(Why::CopyIn),
        ),
        row(
            "COPY FROM STDIN by a simple query, done",
            vec![
                C(query("COPY t FROM STDIN")),
                S(copy_in_response()),
                C(cat(&[copy_data("1\n"), copy_done()])),
                S(cat(&[complete("COPY 1"), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "COPY FROM STDIN by a simple query, CopyFail",
            vec![
                C(query("COPY t FROM STDIN")),
                S(copy_in_response()),
                C(copy_fail()),
                S(cat(&[error(), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "COPY FROM STDIN through the extended protocol, in progress",
            vec![
                C(cat(&[
                    parse("", "COPY t FROM STDIN"),
                    bind(),
                    execute(),
                    sync(),
                ])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    copy_in_response(),
                ])),
                C(copy_data("1\n")),
            ],
            false,
            Err(Why::CopyIn),
        )
        .unnamed(parse_body("", "COPY t FROM STDIN")),
        row(
            "COPY FROM STDIN through the extended protocol: CopyDone, its Sync to come",
            vec![
                C(cat(&[
                    parse("", "COPY t FROM STDIN"),
                    bind(),
                    execute(),
                    sync(),
                ])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    copy_in_response(),
                ])),
                C(cat(&[copy_data("1\n"), copy_done()])),
                S(complete("COPY 1")),
            ],
            false,
            Err(Why::Unsynced),
        )
        .unnamed(parse_body("", "COPY t FROM STDIN")),
        row(
            "COPY FROM STDIN through the extended protocol, done (tokio-postgres)",
            vec![
                C(cat(&[
                    parse("", "COPY t FROM STDIN"),
                    bind(),
                    execute(),
                    sync(),
                ])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    copy_in_response(),
                ])),
                C(cat(&[
                    copy_data("1\n"),
                    copy_data("2\n"),
                    copy_done(),
                    sync(),
                ])),
                S(cat(&[complete("COPY 2"), ready(b'I')])),
            ],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "COPY t FROM STDIN")),
        row(
            "COPY FROM STDIN through the extended protocol: a Sync during the copy is ignored",
            vec![
                C(cat(&[
                    parse("", "COPY t FROM STDIN"),
                    bind(),
                    execute(),
                    sync(),
                ])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    copy_in_response(),
                ])),
                C(cat(&[copy_data("1\n"), sync(), flush(), copy_done()])),
                S(complete("COPY 1")),
            ],
            false,
            Err(Why::Unsynced),
        )
        .unnamed(parse_body("", "COPY t FROM STDIN")),
        row(
            "COPY FROM STDIN through the extended protocol, sent before CopyInResponse came",
            vec![
                C(cat(&[
                    parse("", "COPY t FROM STDIN"),
                    bind(),
                    execute(),
                    sync(),
                    copy_data("1\n"),
                    copy_done(),
                    sync(),
                ])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    copy_in_response(),
                ])),
                S(cat(&[complete("COPY 1"), ready(b'I')])),
            ],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "COPY t FROM STDIN")),
        row(
            "COPY FROM STDIN through the extended protocol, a bad row",
            vec![
                C(cat(&[
                    parse("", "COPY t FROM STDIN"),
                    bind(),
                    execute(),
                    sync(),
                ])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    copy_in_response(),
                ])),
                C(copy_data("x\n")),
                S(error()),
            ],
            false,
            Err(Why::Unsynced),
        )
        .unnamed(parse_body("", "COPY t FROM STDIN")),
        row(
            "COPY FROM STDIN through the extended protocol, a bad row, then the Sync",
            vec![
                C(cat(&[
                    parse("", "COPY t FROM STDIN"),
                    bind(),
                    execute(),
                    sync(),
                ])),
                S(cat(&[
                    parse_complete(),
                    bind_complete(),
                    copy_in_response(),
                ])),
                C(copy_data("x\n")),
                S(error()),
                C(cat(&[copy_done(), sync()])),
                S(ready(b'I')),
            ],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "COPY t FROM STDIN")),
        row(
            "COPY TO STDOUT in progress",
            vec![
                C(query("COPY t TO STDOUT")),
                S(cat(&[copy_out_response(), server_copy_data()])),
            ],
            false,
            Err(Why::CopyOut),
        ),
        row(
            "COPY TO STDOUT done",
            vec![
                C(query("COPY t TO STDOUT")),
                S(cat(&[
                    copy_out_response(),
                    server_copy_data(),
                    server_copy_done(),
                    complete("COPY 1"),
                    ready(b'I'),
                ])),
            ],
            true,
            Ok(()),
        ),
        row(
            "half a query sent",
            vec![C(query("SELECT 1")[..7].to_vec())],
            false,
            Err(Why::MidMessage),
        ),
        row(
            "half a reply received",
            vec![C(query("SELECT 1")), S(query_answered(b'I')[..20].to_vec())],
            false,
            Err(Why::MidMessage),
        ),
        row(
            "a FunctionCall answered",
            vec![
                C(function_call()),
                S(cat(&[function_result(), ready(b'I')])),
            ],
            true,
            Err(Why::Opaque(Opaque::FunctionCall)),
        ),
        row(
            "a custom setting",
            vec![
                C(query("SET app.tenant_id = 'acme'")),
                S(cat(&[complete("SET"), ready(b'I')])),
            ],
            true,
            Err(Why::Opaque(Opaque::CustomSetting)),
        ),
        row(
            "LISTEN",
            vec![
                C(query("LISTEN news")),
                S(cat(&[complete("LISTEN"), ready(b'I')])),
            ],
            true,
            Err(Why::Opaque(Opaque::Listen)),
        ),
        row(
            "set_config through the extended protocol",
            vec![
                C(extended("SELECT set_config('app.x', '1', false)")),
                S(extended_answered(b'I')),
            ],
            true,
            Err(Why::Opaque(Opaque::SetConfig)),
        )
        .unnamed(parse_body("", "SELECT set_config('app.x', '1', false)")),
        row(
            "an ordinary setting",
            vec![
                C(query("SET search_path = public")),
                S(cat(&[complete("SET"), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "a named Parse leaves no unnamed statement",
            vec![
                C(cat(&[parse("s1", "SELECT 1"), sync()])),
                S(cat(&[parse_complete(), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "an unnamed Parse over 64 KiB",
            vec![
                C(cat(&[parse("", &big_sql), sync()])),
                S(cat(&[parse_complete(), ready(b'I')])),
            ],
            true,
            Err(Why::UnnamedStatement),
        ),
        row(
            "an unnamed Parse over 64 KiB, then a simple query ends it",
            vec![
                C(cat(&[parse("", &big_sql), sync()])),
                S(cat(&[parse_complete(), ready(b'I')])),
                C(query("SELECT 1")),
                S(query_answered(b'I')),
            ],
            true,
            Ok(()),
        ),
        row(
            "a failed unnamed Parse leaves no unnamed statement",
            vec![
                C(cat(&[parse("", "SELECT 1"), sync()])),
                S(cat(&[parse_complete(), ready(b'I')])),
                C(cat(&[parse("", "SELEC 1"), sync()])),
                S(cat(&[error(), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "an unnamed Parse skipped after an error leaves the one before",
            vec![
                C(cat(&[parse("", "SELECT 1"), sync()])),
                S(cat(&[parse_complete(), ready(b'I')])),
                C(cat(&[bind(), parse("", "SELECT 2"), sync()])),
                S(cat(&[error(), ready(b'I')])),
            ],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "SELECT 1")),
        row(
            "a Close of the unnamed statement",
            vec![
                C(cat(&[parse("", "SELECT 1"), sync()])),
                S(cat(&[parse_complete(), ready(b'I')])),
                C(cat(&[close_statement(""), sync()])),
                S(cat(&[close_complete(), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "a Close of a named statement keeps the unnamed one",
            vec![
                C(cat(&[parse("", "SELECT 1"), sync()])),
                S(cat(&[parse_complete(), ready(b'I')])),
                C(cat(&[close_statement("s1"), sync()])),
                S(cat(&[close_complete(), ready(b'I')])),
            ],
            true,
            Ok(()),
        )
        .unnamed(parse_body("", "SELECT 1")),
    ]
}

impl Row {
    fn unnamed(mut self, body: Vec<u8>) -> Self {
        self.unnamed = Some(body);
        self
    }
}

/// Feed `steps`, each cut where `cut(step index, length)` says (offsets within it).
fn feed(steps: &[Step], cut: impl Fn(usize, usize) -> Vec<usize>) -> Tracker {
    let mut t = Tracker::new();
    for (i, step) in steps.iter().enumerate() {
        let bytes = match step {
            C(b) | S(b) => b,
        };
        let mut at = 0;
        let mut ends = cut(i, bytes.len());
        ends.push(bytes.len());
        for end in ends {
            let chunk = &bytes[at..end];
            at = end;
            match step {
                C(_) => assert_eq!(t.client_sent(chunk), Ok(Forward::All)),
                S(_) => t.server_sent(chunk).unwrap(),
            }
        }
    }
    t
}

#[test]
fn the_tracker_says_when_a_session_is_idle_and_why_it_cannot_move() {
    let rows = rows();
    assert!(rows.len() >= 40);
    let mut wrong = Vec::new();
    for row in &rows {
        let whole = feed(&row.steps, |_, _| vec![]);
        let got = (whole.is_idle(), whole.can_move(), whole.unnamed_statement());
        let want = (row.idle, row.can_move, row.unnamed.as_deref());
        if got != want {
            wrong.push(format!("{}: got {got:?}, want {want:?}", row.name));
            continue;
        }
        // However the reads cut the bytes, the tracker ends the same.
        let bytewise = feed(&row.steps, |_, len| (1..len).collect());
        assert_eq!(bytewise, whole, "{}: fed byte by byte", row.name);
        for (i, step) in row.steps.iter().enumerate() {
            let len = match step {
                C(b) | S(b) => b.len(),
            };
            // Every cut of short steps; of the 64 KiB Parse, every 997th.
            let every = if len > 4096 { 997 } else { 1 };
            for at in (1..len).step_by(every) {
                let cut = feed(&row.steps, |j, _| if j == i { vec![at] } else { vec![] });
                assert_eq!(cut, whole, "{}: step {i} cut at {at}", row.name);
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "rows the tracker gets wrong:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn a_terminate_is_where_forwarding_stops_and_the_session_is_judged_without_it() {
    // Between queries: everything before it is forwarded; idle.
    let mut t = Tracker::new();
    let bytes = cat(&[query("SELECT 1"), msg(b'X', b"")]);
    assert_eq!(t.client_sent(&bytes), Ok(Forward::Until(bytes.len() - 5)));
    t.server_sent(&query_answered(b'I')).unwrap();
    assert!(t.is_idle());
    // A Terminate in its own read, after a half-read header's worth of nothing.
    let mut t = Tracker::new();
    assert_eq!(t.client_sent(b"X\0\0\0\x04"), Ok(Forward::Until(0)));
    assert!(t.is_idle());
    // An X inside a message body is data, not a Terminate.
    let mut t = Tracker::new();
    assert_eq!(t.client_sent(&query("X")), Ok(Forward::All));
    assert_eq!(t.can_move(), Err(Why::Replies(1)));
    // A query pipelined before it still waits for its reply.
    let mut t = Tracker::new();
    let bytes = cat(&[query("SELECT pg_sleep(1)"), msg(b'X', b"")]);
    assert_eq!(t.client_sent(&bytes), Ok(Forward::Until(bytes.len() - 5)));
    assert!(!t.is_idle());
}

#[test]
fn a_custom_setting_in_the_startup_packet_keeps_the_session_and_a_bad_length_is_an_error() {
    let mut t = Tracker::new();
    t.mark_opaque(Opaque::StartupSetting);
    assert!(t.is_idle());
    assert_eq!(t.can_move(), Err(Why::Opaque(Opaque::StartupSetting)));
    assert!(
        t.can_move()
            .unwrap_err()
            .to_string()
            .contains("startup packet")
    );
    let mut t = Tracker::new();
    assert!(t.client_sent(&[b'Q', 0, 0, 0, 3]).is_err());
    assert!(t.server_sent(&[b'Z', 0xff, 0, 0, 0]).is_err());
}

#[test]
fn every_why_says_what_keeps_the_session() {
    let whys = [
        (Why::MidMessage, "half through"),
        (Why::CopyIn, "COPY FROM STDIN"),
        (Why::CopyOut, "COPY TO STDOUT"),
        (Why::Replies(1), "a query waits"),
        (Why::Replies(3), "3 queries wait"),
        (Why::Unsynced, "Sync"),
        (Why::InTransaction, "in a transaction"),
        (Why::FailedTransaction, "failed transaction"),
        (Why::Opaque(Opaque::Listen), "LISTEN"),
        (Why::UnnamedStatement, "64 KiB"),
    ];
    for (why, want) in whys {
        let text = why.to_string();
        assert!(text.contains(want), "{why:?}: {text}");
        assert!(!text.ends_with('.'), "{text}");
    }
}
