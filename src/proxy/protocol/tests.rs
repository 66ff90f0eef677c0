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

/// A message whose body never changes: its tag and body.
type Fixed = (u8, &'static [u8]);

fn m((tag, body): Fixed) -> Vec<u8> {
    msg(tag, body)
}

// Client messages with a fixed body.
const BIND: Fixed = (b'B', b"\0\0\0\0\0\0\0\0");
const DESCRIBE: Fixed = (b'D', b"P\0");
const EXECUTE: Fixed = (b'E', b"\0\0\0\0\0");
const SYNC: Fixed = (b'S', b"");
const FLUSH: Fixed = (b'H', b"");
const COPY_DONE: Fixed = (b'c', b"");
const COPY_FAIL: Fixed = (b'f', b"stop\0");
const FUNCTION_CALL: Fixed = (b'F', &[0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0]);

// Server messages with a fixed body.
const PARSE_COMPLETE: Fixed = (b'1', b"");
const BIND_COMPLETE: Fixed = (b'2', b"");
const CLOSE_COMPLETE: Fixed = (b'3', b"");
const ROW_DESCRIPTION: Fixed = (b'T', &[0, 0]);
const NO_DATA: Fixed = (b'n', b"");
const PARAMETER_DESCRIPTION: Fixed = (b't', &[0, 0]);
const DATA_ROW: Fixed = (b'D', &[0, 1, 0, 0, 0, 1, b'1']);
const ERROR: Fixed = (b'E', b"SERROR\0C42601\0Msyntax error\0\0");
const NOTICE: Fixed = (b'N', b"SNOTICE\0C00000\0Mhello\0\0");
const PARAMETER_STATUS: Fixed = (b'S', b"TimeZone\0UTC\0");
const NOTIFICATION: Fixed = (b'A', b"\0\0\0\x07news\0hi\0");
const COPY_IN_RESPONSE: Fixed = (b'G', &[0, 0, 0]);
const COPY_OUT_RESPONSE: Fixed = (b'H', &[0, 0, 0]);
const SERVER_COPY_DATA: Fixed = (b'd', b"1\n");
const SERVER_COPY_DONE: Fixed = (b'c', b"");
const FUNCTION_RESULT: Fixed = (b'V', &[0, 0, 0, 1, b'1']);
const PORTAL_SUSPENDED: Fixed = (b's', b"");
const EMPTY_QUERY: Fixed = (b'I', b"");

// Client messages of the test's making.
fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &[sql.as_bytes(), b"\0"].concat())
}
fn parse_body(name: &str, sql: &str) -> Vec<u8> {
    [name.as_bytes(), b"\0", sql.as_bytes(), b"\0", &[0, 0]].concat()
}
fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(b'P', &parse_body(name, sql))
}
fn close_statement(name: &str) -> Vec<u8> {
    msg(b'C', &[b"S", name.as_bytes(), b"\0"].concat())
}
fn copy_data(data: &str) -> Vec<u8> {
    msg(b'd', data.as_bytes())
}
/// Parse, Bind, Describe, Execute, Sync of `sql` (the unnamed statement).
fn extended(sql: &str) -> Vec<u8> {
    cat(&[parse("", sql), m(BIND), m(DESCRIBE), m(EXECUTE), m(SYNC)])
}

// Server messages of the test's making.
fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}
fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &[tag.as_bytes(), b"\0"].concat())
}
/// The replies to `extended(...)` of a statement returning one row.
fn extended_answered(status: u8) -> Vec<u8> {
    cat(&[
        m(PARSE_COMPLETE),
        m(BIND_COMPLETE),
        m(ROW_DESCRIPTION),
        m(DATA_ROW),
        complete("SELECT 1"),
        ready(status),
    ])
}
/// The replies to `query(...)` of a statement returning one row.
fn query_answered(status: u8) -> Vec<u8> {
    cat(&[
        m(ROW_DESCRIPTION),
        m(DATA_ROW),
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

impl Row {
    /// The unnamed statement is the one `sql` made.
    fn unnamed(mut self, sql: &str) -> Self {
        self.unnamed = Some(parse_body("", sql));
        self
    }
}

/// `first`, then `more`.
fn then(first: Vec<Step>, more: Vec<Step>) -> Vec<Step> {
    [first, more].concat()
}

const COPY_IN: &str = "COPY t FROM STDIN";

/// COPY FROM STDIN through the extended protocol up to CopyInResponse (Parse, Bind,
/// Execute and Sync sent at once, as tokio-postgres does).
fn extended_copy_started() -> Vec<Step> {
    vec![
        C(cat(&[parse("", COPY_IN), m(BIND), m(EXECUTE), m(SYNC)])),
        S(cat(&[
            m(PARSE_COMPLETE),
            m(BIND_COMPLETE),
            m(COPY_IN_RESPONSE),
        ])),
    ]
}

/// COPY FROM STDIN by a simple query up to CopyInResponse.
fn simple_copy_started() -> Vec<Step> {
    vec![C(query(COPY_IN)), S(m(COPY_IN_RESPONSE))]
}

/// The unnamed statement `sql` parsed (and synced).
fn unnamed_parsed(sql: &str) -> Vec<Step> {
    vec![
        C(cat(&[parse("", sql), m(SYNC)])),
        S(cat(&[m(PARSE_COMPLETE), ready(b'I')])),
    ]
}

/// BEGIN, then a query that fails.
fn failed_transaction() -> Vec<Step> {
    vec![
        C(query("BEGIN")),
        S(cat(&[complete("BEGIN"), ready(b'T')])),
        C(query("SELEC 1")),
        S(cat(&[m(ERROR), ready(b'E')])),
    ]
}

/// A named statement parsed and described with a Flush, answered, no Sync yet.
fn described_without_sync() -> Vec<Step> {
    vec![
        C(cat(&[
            parse("s1", "SELECT $1"),
            msg(b'D', b"Ss1\0"),
            m(FLUSH),
        ])),
        S(cat(&[
            m(PARSE_COMPLETE),
            m(PARAMETER_DESCRIPTION),
            m(ROW_DESCRIPTION),
        ])),
    ]
}

/// A query ending with `answer` from the server.
fn answered(sql: &str, answer: Vec<u8>) -> Vec<Step> {
    vec![C(query(sql)), S(answer)]
}

fn rows() -> Vec<Row> {
    let big_sql = "x".repeat(MAX_UNNAMED_PARSE);
    let select = || query("SELECT 1");
    vec![
        row("a fresh session", vec![], true, Ok(())),
        row(
            "a simple query sent",
            vec![C(select())],
            false,
            Err(Why::Replies(1)),
        ),
        row(
            "a simple query answered",
            answered("SELECT 1", query_answered(b'I')),
            true,
            Ok(()),
        ),
        row(
            "notices, parameter changes and notifications between queries",
            vec![S(cat(&[m(NOTICE), m(PARAMETER_STATUS), m(NOTIFICATION)]))],
            true,
            Ok(()),
        ),
        row(
            "three pipelined queries, two answered",
            vec![
                C(cat(&[select(), select(), select()])),
                S(query_answered(b'I')),
                S(query_answered(b'I')),
            ],
            false,
            Err(Why::Replies(1)),
        ),
        row(
            "three pipelined queries answered",
            vec![
                C(cat(&[select(), select(), select()])),
                S(query_answered(b'I').repeat(3)),
            ],
            true,
            Ok(()),
        ),
        row(
            "a multi-statement query answered statement by statement",
            vec![
                C(query("SELECT 1; SELECT 2")),
                S(cat(&[
                    m(ROW_DESCRIPTION),
                    m(DATA_ROW),
                    complete("SELECT 1"),
                ])),
                S(cat(&[
                    m(ROW_DESCRIPTION),
                    m(DATA_ROW),
                    complete("SELECT 1"),
                ])),
            ],
            false,
            Err(Why::Replies(1)),
        ),
        row(
            "BEGIN answered",
            answered("BEGIN", cat(&[complete("BEGIN"), ready(b'T')])),
            false,
            Err(Why::InTransaction),
        ),
        row(
            "an error inside a transaction",
            failed_transaction(),
            false,
            Err(Why::FailedTransaction),
        ),
        row(
            "an aborted transaction rolled back",
            then(
                failed_transaction(),
                answered("ROLLBACK", cat(&[complete("ROLLBACK"), ready(b'I')])),
            ),
            true,
            Ok(()),
        ),
        row(
            "a failed simple query outside a transaction",
            answered("SELEC 1", cat(&[m(ERROR), ready(b'I')])),
            true,
            Ok(()),
        ),
        row(
            "extended: Parse, Bind, Describe, Execute, Sync answered",
            vec![C(extended("SELECT 1")), S(extended_answered(b'I'))],
            true,
            Ok(()),
        )
        .unnamed("SELECT 1"),
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
                    m(PARSE_COMPLETE),
                    m(BIND_COMPLETE),
                    m(ROW_DESCRIPTION),
                    m(DATA_ROW),
                    complete("SELECT 1"),
                ])),
            ],
            false,
            Err(Why::Replies(1)),
        )
        .unnamed("SELECT 1"),
        row(
            "extended without a Sync: Parse, Describe, Flush answered",
            described_without_sync(),
            false,
            Err(Why::Unsynced),
        ),
        row(
            "extended without a Sync, then its Sync answered",
            then(described_without_sync(), vec![C(m(SYNC)), S(ready(b'I'))]),
            true,
            Ok(()),
        ),
        row(
            "a Flush alone waits for a Sync",
            vec![C(m(FLUSH))],
            false,
            Err(Why::Unsynced),
        ),
        row(
            "extended: a row limit suspends the portal",
            vec![
                C(cat(&[parse("", "SELECT 1"), m(BIND), m(EXECUTE), m(SYNC)])),
                S(cat(&[
                    m(PARSE_COMPLETE),
                    m(BIND_COMPLETE),
                    m(DATA_ROW),
                    m(PORTAL_SUSPENDED),
                    ready(b'I'),
                ])),
            ],
            true,
            Ok(()),
        )
        .unnamed("SELECT 1"),
        row(
            "extended: an empty query",
            vec![
                C(cat(&[parse("", ""), m(BIND), m(EXECUTE), m(SYNC)])),
                S(cat(&[
                    m(PARSE_COMPLETE),
                    m(BIND_COMPLETE),
                    m(EMPTY_QUERY),
                    ready(b'I'),
                ])),
            ],
            true,
            Ok(()),
        )
        .unnamed(""),
        row(
            "extended: an error skips to the Sync",
            vec![C(extended("SELEC 1")), S(cat(&[m(ERROR), ready(b'I')]))],
            true,
            Ok(()),
        ),
        row(
            "extended: a Query before the Sync is skipped after an error (no reply of its own)",
            vec![
                C(cat(&[
                    parse("", "SELEC 1"),
                    m(BIND),
                    m(EXECUTE),
                    query("SELECT 2"),
                    m(SYNC),
                ])),
                S(cat(&[m(ERROR), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "extended: an error before the client's Sync",
            vec![C(cat(&[parse("", "SELEC 1"), m(FLUSH)])), S(m(ERROR))],
            false,
            Err(Why::Unsynced),
        ),
        row(
            "extended: a Query sent after the error came is skipped too",
            vec![
                C(cat(&[parse("", "SELEC 1"), m(FLUSH)])),
                S(m(ERROR)),
                C(query("SELECT 2")),
                C(m(SYNC)),
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
                    m(PARSE_COMPLETE),
                    m(BIND_COMPLETE),
                    m(NO_DATA),
                    complete("BEGIN"),
                    ready(b'T'),
                ])),
                S(extended_answered(b'T')),
            ],
            false,
            Err(Why::InTransaction),
        )
        .unnamed("SELECT 1"),
        row(
            "extended: a failed commit at the Sync",
            vec![
                C(extended("INSERT INTO deferred VALUES (1)")),
                S(cat(&[
                    m(PARSE_COMPLETE),
                    m(BIND_COMPLETE),
                    m(NO_DATA),
                    complete("INSERT 0 1"),
                    m(ERROR),
                    ready(b'I'),
                ])),
            ],
            true,
            Ok(()),
        )
        .unnamed("INSERT INTO deferred VALUES (1)"),
        row(
            "COPY FROM STDIN by a simple query, in progress",
            then(simple_copy_started(), vec![C(copy_data("1\n"))]),
            false,
            Err(Why::CopyIn),
        ),
        row(
            "COPY FROM STDIN by a simple query, done",
            then(
                simple_copy_started(),
                vec![
                    C(cat(&[copy_data("1\n"), m(COPY_DONE)])),
                    S(cat(&[complete("COPY 1"), ready(b'I')])),
                ],
            ),
            true,
            Ok(()),
        ),
        row(
            "COPY FROM STDIN by a simple query, CopyFail",
            then(
                simple_copy_started(),
                vec![C(m(COPY_FAIL)), S(cat(&[m(ERROR), ready(b'I')]))],
            ),
            true,
            Ok(()),
        ),
        row(
            "COPY FROM STDIN through the extended protocol, in progress",
            then(extended_copy_started(), vec![C(copy_data("1\n"))]),
            false,
            Err(Why::CopyIn),
        )
        .unnamed(COPY_IN),
        row(
            "COPY FROM STDIN through the extended protocol: CopyDone, its Sync to come",
            then(
                extended_copy_started(),
                vec![
                    C(cat(&[copy_data("1\n"), m(COPY_DONE)])),
                    S(complete("COPY 1")),
                ],
            ),
            false,
            Err(Why::Unsynced),
        )
        .unnamed(COPY_IN),
        row(
            "COPY FROM STDIN through the extended protocol, done (tokio-postgres)",
            then(
                extended_copy_started(),
                vec![
                    C(cat(&[
                        copy_data("1\n"),
                        copy_data("2\n"),
                        m(COPY_DONE),
                        m(SYNC),
                    ])),
                    S(cat(&[complete("COPY 2"), ready(b'I')])),
                ],
            ),
            true,
            Ok(()),
        )
        .unnamed(COPY_IN),
        row(
            "COPY FROM STDIN through the extended protocol: a Sync during the copy is ignored",
            then(
                extended_copy_started(),
                vec![
                    C(cat(&[copy_data("1\n"), m(SYNC), m(FLUSH), m(COPY_DONE)])),
                    S(complete("COPY 1")),
                ],
            ),
            false,
            Err(Why::Unsynced),
        )
        .unnamed(COPY_IN),
        row(
            "COPY FROM STDIN through the extended protocol, sent before CopyInResponse came",
            vec![
                C(cat(&[
                    parse("", COPY_IN),
                    m(BIND),
                    m(EXECUTE),
                    m(SYNC),
                    copy_data("1\n"),
                    m(COPY_DONE),
                    m(SYNC),
                ])),
                S(cat(&[
                    m(PARSE_COMPLETE),
                    m(BIND_COMPLETE),
                    m(COPY_IN_RESPONSE),
                ])),
                S(cat(&[complete("COPY 1"), ready(b'I')])),
            ],
            true,
            Ok(()),
        )
        .unnamed(COPY_IN),
        row(
            "COPY FROM STDIN through the extended protocol, a bad row",
            then(
                extended_copy_started(),
                vec![C(copy_data("x\n")), S(m(ERROR))],
            ),
            false,
            Err(Why::Unsynced),
        )
        .unnamed(COPY_IN),
        row(
            "COPY FROM STDIN through the extended protocol, a bad row, then the Sync",
            then(
                extended_copy_started(),
                vec![
                    C(copy_data("x\n")),
                    S(m(ERROR)),
                    C(cat(&[m(COPY_DONE), m(SYNC)])),
                    S(ready(b'I')),
                ],
            ),
            true,
            Ok(()),
        )
        .unnamed(COPY_IN),
        row(
            "COPY TO STDOUT in progress",
            answered(
                "COPY t TO STDOUT",
                cat(&[m(COPY_OUT_RESPONSE), m(SERVER_COPY_DATA)]),
            ),
            false,
            Err(Why::CopyOut),
        ),
        row(
            "COPY TO STDOUT done",
            answered(
                "COPY t TO STDOUT",
                cat(&[
                    m(COPY_OUT_RESPONSE),
                    m(SERVER_COPY_DATA),
                    m(SERVER_COPY_DONE),
                    complete("COPY 1"),
                    ready(b'I'),
                ]),
            ),
            true,
            Ok(()),
        ),
        row(
            "half a query sent",
            vec![C(select()[..7].to_vec())],
            false,
            Err(Why::MidMessage),
        ),
        row(
            "half a reply received",
            vec![C(select()), S(query_answered(b'I')[..20].to_vec())],
            false,
            Err(Why::MidMessage),
        ),
        row(
            "a FunctionCall answered",
            vec![
                C(m(FUNCTION_CALL)),
                S(cat(&[m(FUNCTION_RESULT), ready(b'I')])),
            ],
            true,
            Err(Why::Opaque(Opaque::FunctionCall)),
        ),
        row(
            "a custom setting",
            answered(
                "SET app.tenant_id = 'acme'",
                cat(&[complete("SET"), ready(b'I')]),
            ),
            true,
            Err(Why::Opaque(Opaque::CustomSetting)),
        ),
        row(
            "LISTEN",
            answered("LISTEN news", cat(&[complete("LISTEN"), ready(b'I')])),
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
        .unnamed("SELECT set_config('app.x', '1', false)"),
        row(
            "an ordinary setting",
            answered(
                "SET search_path = public",
                cat(&[complete("SET"), ready(b'I')]),
            ),
            true,
            Ok(()),
        ),
        row(
            "a named Parse leaves no unnamed statement",
            vec![
                C(cat(&[parse("s1", "SELECT 1"), m(SYNC)])),
                S(cat(&[m(PARSE_COMPLETE), ready(b'I')])),
            ],
            true,
            Ok(()),
        ),
        row(
            "an unnamed Parse over 64 KiB",
            unnamed_parsed(&big_sql),
            true,
            Err(Why::UnnamedStatement),
        ),
        row(
            "an unnamed Parse over 64 KiB, then a simple query ends it",
            then(
                unnamed_parsed(&big_sql),
                answered("SELECT 1", query_answered(b'I')),
            ),
            true,
            Ok(()),
        ),
        row(
            "a failed unnamed Parse leaves no unnamed statement",
            then(
                unnamed_parsed("SELECT 1"),
                vec![
                    C(cat(&[parse("", "SELEC 1"), m(SYNC)])),
                    S(cat(&[m(ERROR), ready(b'I')])),
                ],
            ),
            true,
            Ok(()),
        ),
        row(
            "an unnamed Parse skipped after an error leaves the one before",
            then(
                unnamed_parsed("SELECT 1"),
                vec![
                    C(cat(&[m(BIND), parse("", "SELECT 2"), m(SYNC)])),
                    S(cat(&[m(ERROR), ready(b'I')])),
                ],
            ),
            true,
            Ok(()),
        )
        .unnamed("SELECT 1"),
        row(
            "a Close of the unnamed statement",
            then(
                unnamed_parsed("SELECT 1"),
                vec![
                    C(cat(&[close_statement(""), m(SYNC)])),
                    S(cat(&[m(CLOSE_COMPLETE), ready(b'I')])),
                ],
            ),
            true,
            Ok(()),
        ),
        row(
            "a Close of a named statement keeps the unnamed one",
            then(
                unnamed_parsed("SELECT 1"),
                vec![
                    C(cat(&[close_statement("s1"), m(SYNC)])),
                    S(cat(&[m(CLOSE_COMPLETE), ready(b'I')])),
                ],
            ),
            true,
            Ok(()),
        )
        .unnamed("SELECT 1"),
    ]
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
            t.check();
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

/// A driver's batch (pgjdbc): three unnamed 30 KB Parses, each bound and executed, then
/// one Sync. Each is under the 64 KiB cap, so the last one is kept and the session can
/// move once answered (the cap applied to all in flight together: it never could).
#[test]
fn a_batch_of_large_unnamed_parses_can_still_move() {
    let sql = |i: u8| format!("SELECT {} -- {}", i, "y".repeat(30 * 1024));
    let batch: Vec<u8> = cat(&(1..=3)
        .flat_map(|i| [parse("", &sql(i)), m(BIND), m(EXECUTE)])
        .chain([m(SYNC)])
        .collect::<Vec<_>>());
    let answers: Vec<u8> = cat(&(1..=3)
        .flat_map(|_| {
            [
                m(PARSE_COMPLETE),
                m(BIND_COMPLETE),
                m(DATA_ROW),
                complete("SELECT 1"),
            ]
        })
        .chain([ready(b'I')])
        .collect::<Vec<_>>());
    let t = feed(&[C(batch), S(answers)], |_, _| vec![]);
    assert!(t.is_idle());
    assert_eq!(t.can_move(), Ok(()));
    assert_eq!(t.unnamed_statement(), Some(&parse_body("", &sql(3))[..]));
}
