//! Cron expressions, evaluated in a time zone: five fields (minute hour day-of-month month
//! day-of-week), or six with a leading seconds field, or a macro (`@hourly`, `@daily` /
//! `@midnight`, `@weekly`, `@monthly`, `@yearly` / `@annually`). Each field takes `*`, values,
//! ranges `a-b`, steps `*/n` / `a-b/n` / `a/n`, and comma lists; months and weekdays also take
//! English names (`jan`, `mon`); weekday 7 is Sunday, as 0. When both day-of-month and
//! day-of-week are restricted, a day matching either runs (as Vixie cron does).
//!
//! Times are civil times in the schedule's zone. Across a daylight-saving change a time that
//! does not exist that day (spring forward) runs at the same civil time after the shift
//! (02:30 becomes 03:30); a time that occurs twice (fall back) runs once, at its first
//! occurrence.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A parsed cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Day-of-month and day-of-week as written were `*` (unrestricted).
    any_day: bool,
    any_weekday: bool,
}

/// Why an expression is not a cron expression: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CronError(pub String);

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// The first name's value (jan = 1, sun = 0).
    names_from: u32,
}

const SECOND: Field = Field {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
    names_from: 0,
};
const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    names_from: 0,
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    names_from: 0,
};
const DAY: Field = Field {
    name: "day of month",
    min: 1,
    max: 31,
    names: &[],
    names_from: 0,
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &MONTHS,
    names_from: 1,
};
/// 0-7, 7 being Sunday again.
const WEEKDAY: Field = Field {
    name: "day of week",
    min: 0,
    max: 7,
    names: &WEEKDAYS,
    names_from: 0,
};

impl Field {
    fn value(&self, s: &str) -> Result<u32, CronError> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + self.names_from);
        }
        let v: u32 = s.parse().map_err(|_| {
            CronError(format!(
                "{} field: {s:?} is not a number{}",
                self.name,
                if self.names.is_empty() {
                    String::new()
                } else {
                    format!(" or a name ({})", self.names.join(", "))
                }
            ))
        })?;
        if v < self.min || v > self.max {
            return Err(CronError(format!(
                "{} field: {v} is outside {}-{}",
                self.name, self.min, self.max
            )));
        }
        Ok(v)
    }

    /// The set of values of one field, as bits.
    fn parse(&self, text: &str) -> Result<u64, CronError> {
        let mut bits = 0u64;
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        CronError(format!(
                            "{} field: step {s:?} in {item:?} is not a positive number",
                            self.name
                        ))
                    })?;
                    (r, step)
                }
                None => (item, 1),
            };
            let (lo, hi) = if range == "*" || range == "?" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(CronError(format!(
                        "{} field: range {range:?} runs backwards",
                        self.name
                    )));
                }
                (a, b)
            } else if range.is_empty() {
                return Err(CronError(format!(
                    "{} field: empty item in {text:?}",
                    self.name
                )));
            } else {
                let a = self.value(range)?;
                // `a/n` means from a to the end, every n.
                (a, if step > 1 { self.max } else { a })
            };
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok(bits)
    }
}

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(s: &str) -> Result<Self, CronError> {
        let expanded = match s.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            m if m.starts_with('@') => {
                return Err(CronError(format!(
                    "{m:?} is not a known macro (@hourly, @daily, @weekly, @monthly, @yearly)"
                )));
            }
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(CronError(format!(
                    "{n} fields: a schedule has 5 (minute hour day-of-month month day-of-week, e.g. \"30 2 * * *\") or 6 with a leading seconds field"
                )));
            }
        };
        let mut weekdays = WEEKDAY.parse(rest[4])?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        let star = |f: &str| f.starts_with('*') || f.starts_with('?');
        Ok(Cron {
            seconds: SECOND.parse(sec)?,
            minutes: MINUTE.parse(rest[0])?,
            hours: HOUR.parse(rest[1])?,
            days: DAY.parse(rest[2])?,
            months: MONTH.parse(rest[3])?,
            weekdays,
            any_day: star(rest[2]),
            any_weekday: star(rest[4]),
        })
    }
}

fn has(bits: u64, v: i8) -> bool {
    bits & (1u64 << v) != 0
}

impl Cron {
    fn day_matches(&self, d: Date) -> bool {
        let dom = has(self.days, d.day());
        let dow = has(self.weekdays, d.weekday().to_sunday_zero_offset());
        match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (false, true) => dom,
            (true, false) => dow,
            (false, false) => dom || dow,
        }
    }

    /// The first civil time at or after `from` that matches, within about five years.
    fn next_civil(&self, from: DateTime) -> Option<DateTime> {
        let mut t = from;
        let limit = from.checked_add(5.years().days(1)).ok()?;
        while t < limit {
            let d = t.date();
            if !has(self.months, d.month()) {
                t = d
                    .first_of_month()
                    .checked_add(1.month())
                    .ok()?
                    .to_datetime(jiff::civil::Time::midnight());
                continue;
            }
            if !self.day_matches(d) {
                t = d
                    .tomorrow()
                    .ok()?
                    .to_datetime(jiff::civil::Time::midnight());
                continue;
            }
            if !has(self.hours, t.hour()) {
                t = DateTime::new(d.year(), d.month(), d.day(), t.hour(), 0, 0, 0)
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if !has(self.minutes, t.minute()) {
                t = DateTime::new(d.year(), d.month(), d.day(), t.hour(), t.minute(), 0, 0)
                    .ok()?
                    .checked_add(1.minute())
                    .ok()?;
                continue;
            }
            if !has(self.seconds, t.second()) {
                t = t.checked_add(1.second()).ok()?;
                continue;
            }
            return Some(t);
        }
        None
    }

    /// The first run strictly after `after`, in zone `tz`. None when the expression never
    /// matches (`0 0 30 2 *`).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        // Whole seconds: the next candidate is the second after `after`'s.
        let start = Timestamp::from_second(after.as_second()).ok()?;
        let mut from = start
            .checked_add(1.second())
            .ok()?
            .to_zoned(tz.clone())
            .datetime();
        loop {
            let civil = self.next_civil(from)?;
            let at = tz.to_ambiguous_zoned(civil).compatible().ok()?.timestamp();
            if at > after {
                return Some(at);
            }
            // The second occurrence of a repeated hour: move on in civil time.
            from = civil.checked_add(1.second()).ok()?;
        }
    }

    /// The latest run in `(after, until]`, if any: the one a controller that was away makes
    /// up for. `steps` bounds the walk (a schedule every second across a long outage).
    pub fn last_between(
        &self,
        after: Timestamp,
        until: Timestamp,
        tz: &TimeZone,
    ) -> Option<Timestamp> {
        // Runs more than a year old are never made up for: start the walk there.
        let floor = until.checked_sub(366.days().hours(0)).unwrap_or(after);
        let mut t = after.max(floor);
        let mut last = None;
        for _ in 0..2_000_000 {
            match self.next_after(t, tz) {
                Some(n) if n <= until => {
                    last = Some(n);
                    t = n;
                }
                _ => break,
            }
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn next(expr: &str, after: &str, tz: &str) -> String {
        let c: Cron = expr.parse().expect("valid");
        let tz = TimeZone::get(tz).expect("zone");
        c.next_after(ts(after), &tz)
            .map(|t| t.to_zoned(tz.clone()).to_string())
            .unwrap_or_default()
    }

    #[test]
    fn next_runs_in_utc() {
        assert_eq!(
            next("30 2 * * *", "2026-11-27T10:00:00Z", "UTC"),
            "2026-11-28T02:30:00+00:00[UTC]"
        );
        assert_eq!(
            next("*/15 * * * *", "2026-11-27T10:00:00Z", "UTC"),
            "2026-11-27T10:15:00+00:00[UTC]"
        );
        assert_eq!(
            next("0 0 1 * *", "2026-11-27T10:00:00Z", "UTC"),
            "2026-12-01T00:00:00+00:00[UTC]"
        );
        // Strictly after: a run at exactly `after` is not the next.
        assert_eq!(
            next("0 * * * *", "2026-11-27T10:00:00Z", "UTC"),
            "2026-11-27T11:00:00+00:00[UTC]"
        );
        assert_eq!(
            next("@yearly", "2026-11-27T10:00:00Z", "UTC"),
            "2027-01-01T00:00:00+00:00[UTC]"
        );
        // Seconds field: every 20 seconds.
        assert_eq!(
            next("*/20 * * * * *", "2026-11-27T10:00:05.5Z", "UTC"),
            "2026-11-27T10:00:20+00:00[UTC]"
        );
    }

    #[test]
    fn weekdays_names_and_the_day_or_rule() {
        // 2026-11-27 is a Friday.
        assert_eq!(
            next("0 3 * * mon-fri", "2026-11-27T04:00:00Z", "UTC"),
            "2026-11-30T03:00:00+00:00[UTC]"
        );
        assert_eq!(
            next("0 3 * * 7", "2026-11-27T04:00:00Z", "UTC"),
            "2026-11-29T03:00:00+00:00[UTC]",
            "7 is Sunday"
        );
        // Day 1 of the month OR a Sunday, whichever comes first.
        assert_eq!(
            next("0 0 1 * sun", "2026-11-27T04:00:00Z", "UTC"),
            "2026-11-29T00:00:00+00:00[UTC]"
        );
        assert_eq!(
            next("0 0 1 jan-mar/2 *", "2026-11-27T04:00:00Z", "UTC"),
            "2027-01-01T00:00:00+00:00[UTC]"
        );
        assert_eq!(
            next("0 0 29 2 *", "2026-11-27T04:00:00Z", "UTC"),
            "2028-02-29T00:00:00+00:00[UTC]"
        );
        assert_eq!(next("0 0 30 2 *", "2026-11-27T04:00:00Z", "UTC"), "");
    }

    #[test]
    fn time_zones_and_daylight_saving() {
        assert_eq!(
            next("30 2 * * *", "2026-11-27T10:00:00Z", "Europe/Berlin"),
            "2026-11-28T02:30:00+01:00[Europe/Berlin]"
        );
        // 2027-03-28: 02:00 -> 03:00 in Berlin; 02:30 does not exist and runs at 03:30.
        assert_eq!(
            next("30 2 * * *", "2027-03-27T12:00:00Z", "Europe/Berlin"),
            "2027-03-28T03:30:00+02:00[Europe/Berlin]"
        );
        // 2027-10-31: 03:00 -> 02:00; 02:30 happens twice and runs once.
        let c: Cron = "30 2 * * *".parse().unwrap();
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let first = c.next_after(ts("2027-10-30T12:00:00Z"), &tz).unwrap();
        assert_eq!(first, ts("2027-10-31T00:30:00Z"));
        let second = c.next_after(first, &tz).unwrap();
        assert_eq!(second, ts("2027-11-01T01:30:00Z"));
    }

    #[test]
    fn the_latest_missed_run_is_found() {
        let c: Cron = "0 * * * *".parse().unwrap();
        assert_eq!(
            c.last_between(
                ts("2026-11-27T01:30:00Z"),
                ts("2026-11-27T05:10:00Z"),
                &TimeZone::UTC
            ),
            Some(ts("2026-11-27T05:00:00Z"))
        );
        assert_eq!(
            c.last_between(
                ts("2026-11-27T05:00:00Z"),
                ts("2026-11-27T05:59:59Z"),
                &TimeZone::UTC
            ),
            None
        );
    }

    #[test]
    fn bad_expressions_name_the_field() {
        for (expr, says) in [
            ("* * *", "3 fields"),
            ("61 * * * *", "minute field: 61 is outside 0-59"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day of month field: 0"),
            (
                "* * * foo *",
                "month field: \"foo\" is not a number or a name",
            ),
            ("* * * * 8", "day of week field"),
            ("*/0 * * * *", "step \"0\""),
            ("5-1 * * * *", "runs backwards"),
            ("1,,2 * * * *", "empty item"),
            ("@every 5m", "not a known macro"),
        ] {
            let e = expr.parse::<Cron>().expect_err(expr);
            assert!(e.0.contains(says), "{expr}: {e}");
        }
    }
}
