//! The demo's live view: a full-screen terminal picture (ratatui) when standard output is a
//! terminal, a line a second otherwise (CI logs, pipes). Both draw the same [`Frame`].
//!
//! The terminal is not put in raw mode: Ctrl-C must stay a signal, so that the demo cleans up
//! its namespaces however it is stopped.

use std::io::{IsTerminal, Stdout, Write};
use std::time::{Duration, Instant};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, List, ListItem, Paragraph, Sparkline};

/// An uplink as the view shows it.
#[derive(Debug, Clone)]
pub struct UplinkRow {
    pub name: String,
    /// `20 Mbit/s, 10 ms`.
    pub spec: String,
    /// `up`, `dead`, `down`, `standby`, ...
    pub state: String,
    pub mbit: f64,
    /// Recent rates, oldest first, Mbit/s.
    pub history: Vec<f64>,
    /// The shaped rate, Mbit/s: the sparkline's full height.
    pub capacity: f64,
}

/// One picture of the demo.
#[derive(Debug, Clone)]
pub struct Frame {
    pub t: Duration,
    pub caption: String,
    pub uplinks: Vec<UplinkRow>,
    pub download_mbit: f64,
    pub download_bytes: u64,
    /// Longest gap of the live stream so far, when it runs.
    pub stream_gap: Option<Duration>,
    /// The event log, oldest first, each line with its time.
    pub events: Vec<String>,
}

impl Frame {
    fn total(&self) -> f64 {
        self.uplinks.iter().map(|u| u.mbit).sum()
    }
}

pub enum View {
    Tui(Box<Terminal<CrosstermBackend<Stdout>>>),
    Plain {
        out: Box<dyn Write>,
        last: Option<Instant>,
        events: usize,
        caption: String,
    },
}

impl View {
    /// The terminal view when stdout is a terminal and `plain` is not asked for; lines on
    /// `plain_out` otherwise.
    pub fn new(plain: bool, plain_out: Box<dyn Write>) -> View {
        if !plain && std::io::stdout().is_terminal() {
            if let Ok(t) = tui() {
                return View::Tui(Box::new(t));
            }
        }
        View::Plain {
            out: plain_out,
            last: None,
            events: 0,
            caption: String::new(),
        }
    }

    pub fn draw(&mut self, f: &Frame) {
        match self {
            View::Tui(t) => {
                let _ = t.draw(|area| draw_tui(area, f));
            }
            View::Plain {
                out,
                last,
                events,
                caption,
            } => {
                if *caption != f.caption {
                    let _ = writeln!(out, "{:>6.1}s  -- {}", f.t.as_secs_f64(), f.caption);
                    caption.clone_from(&f.caption);
                }
                for e in &f.events[(*events).min(f.events.len())..] {
                    let _ = writeln!(out, "        >> {e}");
                }
                *events = f.events.len();
                if last.is_none_or(|l| l.elapsed() >= Duration::from_secs(1)) {
                    *last = Some(Instant::now());
                    let _ = writeln!(out, "{}", plain_line(f));
                }
                let _ = out.flush();
            }
        }
    }

    /// Gives the terminal back (the summary is printed on the normal screen after this).
    pub fn finish(self) {
        if let View::Tui(_) = self {
            restore();
        }
    }
}

fn plain_line(f: &Frame) -> String {
    let per: Vec<String> = f
        .uplinks
        .iter()
        .map(|u| format!("{} {:>5.1} {:<7}", u.name, u.mbit, u.state))
        .collect();
    let mut s = format!(
        "{:>6.1}s  {}  total {:>5.1} Mbit/s  download {:>5.1} Mbit/s {:>7.1} MiB",
        f.t.as_secs_f64(),
        per.join("  "),
        f.total(),
        f.download_mbit,
        f.download_bytes as f64 / f64::from(1 << 20)
    );
    if let Some(g) = f.stream_gap {
        s.push_str(&format!(
            "  stream: longest gap {:.0} ms",
            g.as_secs_f64() * 1e3
        ));
    }
    s
}

fn tui() -> std::io::Result<Terminal<CrosstermBackend<Stdout>>> {
    let mut out = std::io::stdout();
    execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
    // A panic must not leave the terminal on the alternate screen with no cursor.
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        prev(info);
    }));
    Terminal::new(CrosstermBackend::new(out))
}

fn restore() {
    let _ = execute!(
        std::io::stdout(),
        terminal::LeaveAlternateScreen,
        cursor::Show
    );
}

fn state_style(state: &str) -> Style {
    let c = match state {
        "up" => Color::Green,
        "degraded" | "standby" => Color::Yellow,
        "dead" | "down" => Color::Red,
        _ => Color::Gray,
    };
    Style::default().fg(c).add_modifier(Modifier::BOLD)
}

fn draw_tui(frame: &mut ratatui::Frame, f: &Frame) {
    let n = f.uplinks.len();
    let mut rows = vec![Constraint::Length(3)];
    rows.extend(std::iter::repeat_n(Constraint::Length(5), n));
    rows.extend([Constraint::Length(4), Constraint::Min(5)]);
    let areas = Layout::vertical(rows).split(frame.area());
    let head = Paragraph::new(Line::from(vec![
        Span::styled(
            format!("t = {:>5.1} s   ", f.t.as_secs_f64()),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw(f.caption.clone()),
    ]))
    .block(
        Block::default()
            .borders(Borders::ALL)
            .title(" braid demo: LAN client → gateway ⇉ converter → server "),
    );
    frame.render_widget(head, areas[0]);
    for (i, u) in f.uplinks.iter().enumerate() {
        let width = areas[1 + i].width.saturating_sub(2) as usize;
        let data: Vec<u64> = u
            .history
            .iter()
            .skip(u.history.len().saturating_sub(width))
            .map(|m| (m * 10.0).round() as u64)
            .collect();
        let title = Line::from(vec![
            Span::raw(format!(" {} ({}) ", u.name, u.spec)),
            Span::styled(format!("{:<8}", u.state), state_style(&u.state)),
            Span::raw(format!(" {:>5.1} Mbit/s ", u.mbit)),
        ]);
        let spark = Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(title))
            .data(&data)
            .max((u.capacity * 11.0) as u64)
            .style(Style::default().fg(Color::Cyan));
        frame.render_widget(spark, areas[1 + i]);
    }
    let mut lines = vec![Line::from(format!(
        "total on the uplinks {:>5.1} Mbit/s    download {:>5.1} Mbit/s, {:.1} MiB, every byte checked",
        f.total(),
        f.download_mbit,
        f.download_bytes as f64 / f64::from(1 << 20)
    ))];
    if let Some(g) = f.stream_gap {
        lines.push(Line::from(format!(
            "live stream (4 Mbit/s, server → client): longest gap so far {:.0} ms",
            g.as_secs_f64() * 1e3
        )));
    }
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" total ")),
        areas[1 + n],
    );
    let shown = areas[2 + n].height.saturating_sub(2) as usize;
    let items: Vec<ListItem> = f
        .events
        .iter()
        .skip(f.events.len().saturating_sub(shown))
        .map(|e| ListItem::new(e.clone()))
        .collect();
    frame.render_widget(
        List::new(items).block(Block::default().borders(Borders::ALL).title(" events ")),
        areas[2 + n],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_says_every_uplink_and_the_total() {
        let f = Frame {
            t: Duration::from_millis(12_300),
            caption: "x".into(),
            uplinks: vec![
                UplinkRow {
                    name: "dsl".into(),
                    spec: String::new(),
                    state: "up".into(),
                    mbit: 19.0,
                    history: vec![],
                    capacity: 20.0,
                },
                UplinkRow {
                    name: "lte".into(),
                    spec: String::new(),
                    state: "dead".into(),
                    mbit: 0.5,
                    history: vec![],
                    capacity: 30.0,
                },
            ],
            download_mbit: 18.0,
            download_bytes: 3 << 20,
            stream_gap: Some(Duration::from_millis(40)),
            events: vec![],
        };
        let l = plain_line(&f);
        assert!(l.contains("12.3s"), "{l}");
        assert!(
            l.contains("dsl  19.0 up") && l.contains("lte   0.5 dead"),
            "{l}"
        );
        assert!(
            l.contains("total  19.5 Mbit/s") && l.contains("3.0 MiB"),
            "{l}"
        );
        assert!(l.contains("longest gap 40 ms"), "{l}");
    }
}
