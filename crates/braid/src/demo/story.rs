//! The demo's story as plain data and functions, tested without root: the uplinks it is told
//! to build (`--uplinks`), the scripted events and when they happen, and the figures of the
//! summary computed from what was sampled. The I/O (lab, daemons, clients, the live view)
//! lives in `mod.rs` around these.

use std::time::Duration;

use serde::Serialize;

/// One uplink of the lab, as `--uplinks` names it: `name:rate:delay[:backup]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UplinkSpec {
    pub name: String,
    /// Shaped rate, both ways, in bit/s.
    pub rate_bps: u64,
    /// One-way delay, both ways (the RTT is twice this).
    #[serde(rename = "delay_ms", serialize_with = "millis")]
    pub delay: Duration,
    pub backup: bool,
}

impl UplinkSpec {
    /// `dsl 20 Mbit/s 10 ms`, and ` (backup)` for a backup.
    pub fn describe(&self) -> String {
        format!(
            "{} {} Mbit/s {} ms{}",
            self.name,
            self.rate_bps as f64 / 1e6,
            self.delay.as_millis(),
            if self.backup { " (backup)" } else { "" }
        )
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// The default lab: a DSL line and an LTE modem, as in most homes that bond.
pub const DEFAULT_UPLINKS: &str = "dsl:20mbit:10ms,lte:30mbit:40ms";
/// The lab has at most 8 links between gateway and converter.
pub const MAX_UPLINKS: usize = 8;

/// Parses `--uplinks`; an error names the item and what is wrong with it.
pub fn parse_uplinks(s: &str) -> Result<Vec<UplinkSpec>, String> {
    let mut v: Vec<UplinkSpec> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = |why: String| format!("--uplinks: {item:?}: {why}");
        let parts: Vec<&str> = item.split(':').collect();
        let (name, rate, delay, flag) = match parts.as_slice() {
            [n, r, d] => (*n, *r, *d, None),
            [n, r, d, f] => (*n, *r, *d, Some(*f)),
            _ => return Err(bad("expected name:rate:delay[:backup]".into())),
        };
        if name.is_empty()
            || name.len() > 15
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(
                "the name must be 1 to 15 letters, digits, '-' or '_'".into()
            ));
        }
        if v.iter().any(|u| u.name == name) {
            return Err(bad(format!("{name:?} is named twice")));
        }
        let rate_bps = parse_rate(rate).map_err(bad)?;
        let delay = parse_delay(delay).map_err(bad)?;
        let backup = match flag {
            None => false,
            Some("backup") => true,
            Some(f) => return Err(bad(format!("{f:?} is not a flag (the one flag is backup)"))),
        };
        v.push(UplinkSpec {
            name: name.to_string(),
            rate_bps,
            delay,
            backup,
        });
    }
    if v.len() < 2 || v.len() > MAX_UPLINKS {
        return Err(format!(
            "--uplinks: {} uplinks; the demo bonds 2 to {MAX_UPLINKS}",
            v.len()
        ));
    }
    if v.iter().all(|u| u.backup) {
        return Err("--uplinks: every uplink is a backup; at least one must be primary".into());
    }
    Ok(v)
}

/// `20mbit`, `500kbit`, `1gbit`, `20` (Mbit/s): between 100 kbit/s and 10 Gbit/s.
fn parse_rate(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let (num, unit) = split_unit(&lower);
    let mult = match unit {
        "" | "mbit" | "m" => 1e6,
        "kbit" | "k" => 1e3,
        "gbit" | "g" => 1e9,
        u => return Err(format!("rate unit {u:?}: use kbit, mbit or gbit")),
    };
    let bps = num
        .parse::<f64>()
        .map_err(|_| format!("rate {s:?} is not a number with a unit (20mbit)"))?
        * mult;
    if !(1e5..=1e10).contains(&bps) {
        return Err(format!("rate {s:?}: between 100kbit and 10gbit, please"));
    }
    Ok(bps as u64)
}

/// `10ms`, `0.3s`, `40` (ms): at most 2 s one way.
fn parse_delay(s: &str) -> Result<Duration, String> {
    let lower = s.to_ascii_lowercase();
    let (num, unit) = split_unit(&lower);
    let mult = match unit {
        "" | "ms" => 1e-3,
        "s" => 1.0,
        "us" => 1e-6,
        u => return Err(format!("delay unit {u:?}: use ms, s or us")),
    };
    let secs = num
        .parse::<f64>()
        .map_err(|_| format!("delay {s:?} is not a number with a unit (10ms)"))?
        * mult;
    if !(0.0..=2.0).contains(&secs) {
        return Err(format!("delay {s:?}: between 0 and 2s one way, please"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn split_unit(s: &str) -> (&str, &str) {
    let at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s.split_at(at)
}

/// What happens to an uplink during the story.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Carrier lost (the cable pulled, the modem off).
    Cut,
    /// Carrier back.
    Back,
    /// Carrier up, everything dropped silently (a DSL or LTE line that stopped passing traffic).
    Blackhole,
    /// The blackhole ends.
    Clear,
}

impl Kind {
    /// The longest stream stall the failover issue's bounds allow at this event.
    pub fn bound(self) -> Duration {
        match self {
            Kind::Cut | Kind::Back => Duration::from_secs(1),
            Kind::Blackhole | Kind::Clear => Duration::from_millis(1500),
        }
    }

    fn caption(self) -> &'static str {
        match self {
            Kind::Cut => "cut",
            Kind::Back => "back",
            Kind::Blackhole => "silently dropping everything",
            Kind::Clear => "passing traffic again",
        }
    }
}

/// A scripted event, `at` counted from the start of the bonded phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: Duration,
    pub kind: Kind,
    pub uplink: usize,
}

impl Event {
    pub fn caption(&self, uplinks: &[UplinkSpec]) -> String {
        format!("{} {}", uplinks[self.uplink].name, self.kind.caption())
    }
}

/// The shortest story with failures: each event needs its few seconds (a blackhole takes up
/// to 3 s to be judged dead).
pub const MIN_DURATION_WITH_FAILOVER: Duration = Duration::from_secs(16);
pub const MIN_DURATION: Duration = Duration::from_secs(4);

/// The events of a bonded phase of `duration`: the last primary loses its carrier at 20 % and
/// gets it back at 40 %, the first primary (where connections start: the hardest case for the
/// kernel) is blackholed from 55 % to 75 %, which leaves a quarter to see it come back. None
/// with `failover` off.
pub fn timeline(uplinks: &[UplinkSpec], duration: Duration, failover: bool) -> Vec<Event> {
    if !failover {
        return Vec::new();
    }
    let primaries: Vec<usize> = (0..uplinks.len()).filter(|i| !uplinks[*i].backup).collect();
    let (first, last) = (primaries[0], primaries[primaries.len() - 1]);
    let at = |f: f64| Duration::from_secs(((duration.as_secs_f64() * f).round()) as u64);
    vec![
        Event {
            at: at(0.2),
            kind: Kind::Cut,
            uplink: last,
        },
        Event {
            at: at(0.4),
            kind: Kind::Back,
            uplink: last,
        },
        Event {
            at: at(0.55),
            kind: Kind::Blackhole,
            uplink: first,
        },
        Event {
            at: at(0.75),
            kind: Kind::Clear,
            uplink: first,
        },
    ]
}

/// When the bonded phase's steady part ends: at the first event, or the end.
pub fn steady_end(events: &[Event], duration: Duration) -> Duration {
    events.first().map_or(duration, |e| e.at)
}

/// The caption of the moment `t` of the bonded phase.
pub fn caption_at(t: Duration, events: &[Event], uplinks: &[UplinkSpec]) -> String {
    match events.iter().rev().find(|e| e.at <= t) {
        None => "bonded: every uplink carries the same download".into(),
        Some(e) => match e.kind {
            Kind::Cut => format!("{}: the others carry on", e.caption(uplinks)),
            Kind::Back => format!("{}: bonded again", e.caption(uplinks)),
            Kind::Blackhole => format!(
                "{} (carrier up): braid finds it dead and moves off it",
                e.caption(uplinks)
            ),
            Kind::Clear => format!("{}: braid brings it back", e.caption(uplinks)),
        },
    }
}

/// The longest of `gaps` (each `(ended, length)`, times from the start of the bonded phase)
/// that overlaps `[from, to)`.
pub fn longest_gap_in(gaps: &[(Duration, Duration)], from: Duration, to: Duration) -> Duration {
    gaps.iter()
        .filter(|(end, len)| *end > from && end.saturating_sub(*len) < to)
        .map(|(_, len)| *len)
        .max()
        .unwrap_or(Duration::ZERO)
}

/// Per event, the window its stall is looked for in: from the event to the next one (or the
/// end).
pub fn windows(events: &[Event], end: Duration) -> Vec<(Duration, Duration)> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.at, events.get(i + 1).map_or(end, |n| n.at)))
        .collect()
}

/// A reading of counters at a time (from the start of the bonded phase; negative times are
/// not needed: the single-link phase is summarised on its own).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub t: Duration,
    /// Bytes both ways on each uplink's interface so far.
    pub uplink_bytes: Vec<u64>,
    /// Download bytes received by the client so far.
    pub download: u64,
}

/// Mbit/s between two samples, per uplink, and of the download.
pub fn rates(a: &Sample, b: &Sample) -> (Vec<f64>, f64) {
    let dt = (b.t.saturating_sub(a.t)).as_secs_f64().max(1e-3);
    let r = |x: u64, y: u64| y.saturating_sub(x) as f64 * 8.0 / dt / 1e6;
    (
        a.uplink_bytes
            .iter()
            .zip(&b.uplink_bytes)
            .map(|(x, y)| r(*x, *y))
            .collect(),
        r(a.download, b.download),
    )
}

/// The download's Mbit/s over `[from, to]`, from the samples nearest inside it.
pub fn download_rate(samples: &[Sample], from: Duration, to: Duration) -> Option<f64> {
    let a = samples.iter().find(|s| s.t >= from)?;
    let b = samples.iter().rev().find(|s| s.t <= to)?;
    (b.t > a.t).then(|| rates(a, b).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_uplinks_parse() {
        let u = parse_uplinks(DEFAULT_UPLINKS).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].name, "dsl");
        assert_eq!(u[0].rate_bps, 20_000_000);
        assert_eq!(u[1].delay, Duration::from_millis(40));
        let u = parse_uplinks("dsl:20mbit:10ms, lte:30mbit:40ms ,sat:10Mbit:0.3s:backup").unwrap();
        assert_eq!(u.len(), 3);
        assert!(u[2].backup && !u[0].backup);
        assert_eq!(u[2].delay, Duration::from_millis(300));
        assert_eq!(u[2].describe(), "sat 10 Mbit/s 300 ms (backup)");
        assert_eq!(
            parse_uplinks("a:500kbit:1ms,b:1gbit:0").unwrap()[0].rate_bps,
            500_000
        );
    }

    #[test]
    fn bad_uplinks_name_the_item_and_the_reason() {
        for (s, want) in [
            ("dsl:20mbit:10ms", "1 uplinks"),
            (
                "dsl:20mbit,lte:30mbit:4ms",
                "\"dsl:20mbit\": expected name:rate:delay",
            ),
            ("dsl:20mbps:10ms,lte:1m:1ms", "rate unit \"mbps\""),
            ("dsl:fast:10ms,lte:1m:1ms", "rate unit \"fast\""),
            ("dsl:20mbit:10min,lte:1m:1ms", "delay unit \"min\""),
            ("dsl:20mbit:5s,lte:1m:1ms", "between 0 and 2s"),
            ("dsl:20kbit:5ms,lte:1m:1ms", "between 100kbit and 10gbit"),
            ("dsl:20m:5ms,dsl:1m:1ms", "named twice"),
            ("a b:20m:5ms,c:1m:1ms", "the name must be"),
            ("dsl:20m:5ms:spare,c:1m:1ms", "the one flag is backup"),
            (
                "a:20m:5ms:backup,b:1m:1ms:backup",
                "at least one must be primary",
            ),
            (
                "1:1m:1ms,2:1m:1ms,3:1m:1ms,4:1m:1ms,5:1m:1ms,6:1m:1ms,7:1m:1ms,8:1m:1ms,9:1m:1ms",
                "9 uplinks",
            ),
        ] {
            let e = parse_uplinks(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn the_story_cuts_the_last_primary_and_blackholes_the_first() {
        let u = parse_uplinks("dsl:20m:10ms,lte:30m:40ms,sat:10m:300ms:backup").unwrap();
        let t = timeline(&u, Duration::from_secs(20), true);
        let at: Vec<u64> = t.iter().map(|e| e.at.as_secs()).collect();
        assert_eq!(at, [4, 8, 11, 15]);
        assert_eq!(t[0].kind, Kind::Cut);
        assert_eq!((t[0].uplink, t[1].uplink), (1, 1), "lte, not the backup");
        assert_eq!((t[2].uplink, t[3].uplink), (0, 0));
        assert_eq!(t[0].caption(&u), "lte cut");
        assert!(timeline(&u, Duration::from_secs(20), false).is_empty());
        assert_eq!(
            steady_end(&t, Duration::from_secs(20)),
            Duration::from_secs(4)
        );
        assert!(caption_at(Duration::from_secs(2), &t, &u).starts_with("bonded"));
        assert!(caption_at(Duration::from_secs(12), &t, &u).contains("dsl silently"));
        // A blackhole must last long enough to be judged dead (3 s at most).
        let t = timeline(&u, MIN_DURATION_WITH_FAILOVER, true);
        assert!(t[3].at - t[2].at >= Duration::from_secs(3));
    }

    #[test]
    fn a_stall_belongs_to_the_window_it_overlaps() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let gaps = [
            (ms(5400), ms(400)),
            (ms(13_900), ms(800)),
            (ms(13_950), ms(50)),
        ];
        let w = windows(
            &[
                Event {
                    at: s(5),
                    kind: Kind::Cut,
                    uplink: 0,
                },
                Event {
                    at: s(13),
                    kind: Kind::Blackhole,
                    uplink: 0,
                },
            ],
            s(20),
        );
        assert_eq!(w, [(s(5), s(13)), (s(13), s(20))]);
        assert_eq!(longest_gap_in(&gaps, w[0].0, w[0].1), ms(400));
        assert_eq!(longest_gap_in(&gaps, w[1].0, w[1].1), ms(800));
        assert_eq!(longest_gap_in(&gaps, s(0), s(5)), Duration::ZERO);
    }

    #[test]
    fn rates_come_from_counter_differences() {
        let s = |t: u64, a: u64, b: u64, d: u64| Sample {
            t: Duration::from_secs(t),
            uplink_bytes: vec![a, b],
            download: d,
        };
        let samples = [
            s(0, 0, 0, 0),
            s(1, 2_500_000, 3_750_000, 5_000_000),
            s(2, 5_000_000, 7_500_000, 10_000_000),
        ];
        let (per, dl) = rates(&samples[0], &samples[2]);
        assert_eq!(per, [20.0, 30.0]);
        assert_eq!(dl, 40.0);
        assert_eq!(
            download_rate(&samples, Duration::from_secs(1), Duration::from_secs(2)),
            Some(40.0)
        );
        assert_eq!(
            download_rate(&samples, Duration::from_secs(3), Duration::from_secs(4)),
            None
        );
    }
}
