//! `eventos log …`: look inside a data directory without opening the log.
//!
//! Everything here goes through [`eventos_log::inspect`], which takes no
//! lock and writes nothing, so these commands are safe beside a running
//! `eventos up` and on a copy of a directory from a machine that crashed.

use std::fmt::Write as _;
use std::io::{self, IsTerminal as _, Write};
use std::path::PathBuf;

use eventos_core::Event;
use eventos_log::Cut;
use eventos_log::inspect::{DataDir, InspectError, Owner, StoredEvent, TopicStat};

use crate::progress::Bar;

/// Options of `eventos log`.
#[derive(Debug, clap::Args)]
pub(crate) struct LogArgs {
    #[command(subcommand)]
    command: LogCommand,
}

#[derive(Debug, clap::Subcommand)]
enum LogCommand {
    /// List the topics with their segments and sizes.
    Topics(DataDirArg),
    /// Scan one topic: offsets, events, control records, each group's
    /// cursor, and any torn or corrupt tail.
    Stat(StatArgs),
    /// Print a topic's events, one per line.
    Dump(DumpArgs),
}

#[derive(Debug, clap::Args)]
struct DataDirArg {
    /// The data directory the log lives in.
    #[arg(long, env = "EVENTOS_DATA_DIR", default_value = "./eventos-data")]
    data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct StatArgs {
    /// The topic to scan.
    #[arg(long)]
    topic: String,
    #[command(flatten)]
    dir: DataDirArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// One CloudEvents structured JSON document per line.
    Json,
    /// One readable line per event: offset, append time, type, id, data.
    Text,
}

#[derive(Debug, clap::Args)]
struct DumpArgs {
    /// The topic to print.
    #[arg(long)]
    topic: String,
    /// The first offset to print.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Print at most this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// How to print each event.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    #[command(flatten)]
    dir: DataDirArg,
}

pub(crate) fn run(args: LogArgs) -> anyhow::Result<()> {
    let out = io::stdout().lock();
    let result = match args.command {
        LogCommand::Topics(a) => topics(&a, out),
        LogCommand::Stat(a) => stat(&a, out),
        LogCommand::Dump(a) => dump(&a, out),
    };
    match result {
        // The reader (`| head`) has what it wanted.
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn open(dir: &DataDirArg) -> Result<DataDir, InspectError> {
    // `eventos up` keeps its log in `<data-dir>/log`; accept either the
    // system's data directory or the log's own.
    let nested = dir.data_dir.join("log");
    if !dir.data_dir.join("topics").is_dir() && nested.join("topics").is_dir() {
        return DataDir::open(&nested);
    }
    DataDir::open(&dir.data_dir)
}

fn topics(args: &DataDirArg, mut out: impl Write) -> anyhow::Result<()> {
    let data = open(args)?;
    let topics = data.topics()?;
    if topics.is_empty() {
        writeln!(out, "no topics in {}", data.path().display())?;
        return Ok(());
    }
    let width = topics
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    writeln!(
        out,
        "{:<width$}  {:>8}  {:>12}  {:>12}  {:>6}",
        "TOPIC", "SEGMENTS", "BYTES", "FIRST OFFSET", "GROUPS"
    )?;
    for t in &topics {
        writeln!(
            out,
            "{:<width$}  {:>8}  {:>12}  {:>12}  {:>6}",
            t.name, t.segments, t.bytes, t.first_offset, t.groups
        )?;
    }
    out.flush()?;
    Ok(())
}

fn stat(args: &StatArgs, mut out: impl Write) -> anyhow::Result<()> {
    let data = open(&args.dir)?;
    let owner = data.owner();
    let mut bar = Bar::new("scanning");
    let s = data.stat(&args.topic, |p| bar.update(p))?;
    bar.finish();
    print_stat(&mut out, &data, &owner, &s)?;
    out.flush()?;
    Ok(())
}

fn print_stat(
    out: &mut impl Write,
    data: &DataDir,
    owner: &Owner,
    s: &TopicStat,
) -> io::Result<()> {
    let owner_text = match owner {
        Owner::Free => "not in use".to_owned(),
        Owner::Held(who) => format!("in use by {who}: these figures are a snapshot"),
        Owner::Unknown => "in use or not (this platform does not tell)".to_owned(),
    };
    writeln!(out, "topic:            {}", s.name)?;
    writeln!(
        out,
        "data directory:   {} ({owner_text})",
        data.path().display()
    )?;
    writeln!(out, "segments:         {} ({} bytes)", s.segments, s.bytes)?;
    writeln!(out, "first offset:     {}", s.first_offset)?;
    writeln!(out, "next offset:      {}", s.next_offset)?;
    writeln!(out, "events:           {}", s.events)?;
    writeln!(out, "control records:  {}", s.control_records)?;
    match s.last_append {
        Some(t) => writeln!(
            out,
            "last append:      {}",
            t.to_rfc3339_opts(eventos_core::chrono::SecondsFormat::Millis, true)
        )?,
        None => writeln!(out, "last append:      none")?,
    }
    match &s.tail {
        None => writeln!(out, "tail:             clean")?,
        Some(cut) => writeln!(out, "tail:             {}", describe_cut(cut, owner))?,
    }
    if s.groups.is_empty() {
        writeln!(out, "groups:           none")?;
        return Ok(());
    }
    let width = s
        .groups
        .iter()
        .map(|g| g.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    writeln!(
        out,
        "{:<width$}  {:>12}  {:>10}  {:>8}  {:>13}  {:>10}",
        "GROUP", "CURSOR", "UNSETTLED", "RETRIES", "DEAD-LETTERED", "ACKED"
    )?;
    for g in &s.groups {
        writeln!(
            out,
            "{:<width$}  {:>12}  {:>10}  {:>8}  {:>13}  {:>10}",
            g.name, g.cursor, g.unsettled, g.pending_retries, g.dead_lettered, g.acked
        )?;
    }
    Ok(())
}

fn describe_cut(cut: &Cut, owner: &Owner) -> String {
    let later = match cut.removed_segments {
        0 => String::new(),
        1 => " and the 1 segment after it".to_owned(),
        n => format!(" and the {n} segments after it"),
    };
    let remedy = if matches!(owner, Owner::Held(_)) {
        "it may be a write in progress; if it persists, the owner's next restart cuts it"
    } else {
        "the next open of the log cuts it"
    };
    format!(
        "{} at byte {}: {} bytes{later} past the last valid record ({}); {remedy}",
        cut.path.display(),
        cut.at,
        cut.bytes,
        cut.reason
    )
}

fn dump(args: &DumpArgs, out: impl Write) -> anyhow::Result<()> {
    let data = open(&args.dir)?;
    let owner = data.owner();
    let mut events = data.events(&args.topic, args.from)?;
    // A bar between the lines of a dump on the terminal would garble them;
    // it helps when the dump goes to a file or a pipe.
    if !io::stdout().is_terminal() {
        let mut bar = Bar::new("dumping");
        events = events.on_progress(move |p| bar.update(p));
    }
    let mut out = io::BufWriter::new(out);
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut printed = 0u64;
    let mut skipped = 0u64;
    while printed < limit {
        let Some(item) = events.next() else { break };
        match item {
            Ok(stored) => {
                match args.format {
                    Format::Json => {
                        out.write_all(&stored.event.to_json())?;
                        out.write_all(b"\n")?;
                    }
                    Format::Text => writeln!(out, "{}", text_line(&stored))?,
                }
                printed += 1;
            }
            Err(e @ InspectError::Undecodable { .. }) => {
                out.flush()?;
                eprintln!("warning: {e}");
                skipped += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    out.flush()?;
    drop(out);
    let tail = events.tail().cloned();
    // Dropping the iterator clears its progress bar before the warnings.
    drop(events);
    if let Some(cut) = tail {
        eprintln!(
            "warning: the topic ends early at a damaged tail: {}",
            describe_cut(&cut, &owner)
        );
    }
    if skipped > 0 {
        anyhow::bail!(
            "{skipped} events of topic `{}` could not be decoded and were not printed; see the warnings above",
            args.topic
        );
    }
    Ok(())
}

/// Payloads longer than this are cut in text lines.
const PREVIEW_CHARS: usize = 120;

fn text_line(stored: &StoredEvent) -> String {
    let e: &Event = &stored.event;
    let appended = stored.appended().map_or_else(
        || format!("@{}ms", stored.appended_ms),
        |t| t.to_rfc3339_opts(eventos_core::chrono::SecondsFormat::Millis, true),
    );
    let mut line = format!(
        "{} {appended} {} id={} source={}",
        stored.offset,
        e.ty(),
        e.id(),
        e.source()
    );
    if let Some(subject) = e.subject() {
        let _ = write!(line, " subject={subject}");
    }
    match e.data() {
        None => {}
        Some(data) => match std::str::from_utf8(data) {
            Ok(text) => {
                let mut preview: String = text.chars().take(PREVIEW_CHARS).collect();
                if preview.len() < text.len() {
                    preview.push('…');
                }
                // One event, one line, whatever the payload holds.
                let preview = preview.replace(['\n', '\r'], " ");
                let _ = write!(line, " data={preview}");
            }
            Err(_) => {
                let _ = write!(line, " data=<{} bytes>", data.len());
            }
        },
    }
    line
}
