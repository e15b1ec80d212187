//! Which restore points of one VM a retention keeps, and why: pure, unit-tested as is.
//!
//! Newest first: `keepLast` keeps the N newest; each GFS rule keeps the newest point of each of
//! the N most recent days (ISO weeks, months, years) that have a point, counted in the
//! retention's time zone. A point is kept when any rule keeps it, and every reason is given.
//! The newest point, and the newest verified point, are always kept: a retention can thin a
//! VM's history, never end it or leave it without a point known good.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use sendense_crds::repository::Retention;

/// One restore point, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub name: String,
    /// The restore point's time: its schedule run's, else when its copy completed.
    pub time: Timestamp,
    pub verified: bool,
}

/// The verdict on one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub name: String,
    pub time: Timestamp,
    /// Why it is kept (empty: it is pruned).
    pub kept_by: Vec<String>,
    /// For a pruned point, why each rule passes it over.
    pub passed_over: Vec<String>,
}

impl Verdict {
    pub fn kept(&self) -> bool {
        !self.kept_by.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
enum Period {
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    fn key(self, t: Timestamp, tz: &TimeZone) -> (i16, i16, i8) {
        let d = t.to_zoned(tz.clone()).date();
        match self {
            Period::Day => (d.year(), d.month() as i16, d.day()),
            Period::Week => {
                let w = d.iso_week_date();
                (w.year(), w.week() as i16, 0)
            }
            Period::Month => (d.year(), d.month() as i16, 0),
            Period::Year => (d.year(), 0, 0),
        }
    }

    fn rule(self) -> &'static str {
        match self {
            Period::Day => "keepDaily",
            Period::Week => "keepWeekly",
            Period::Month => "keepMonthly",
            Period::Year => "keepYearly",
        }
    }

    fn describe(self, t: Timestamp, tz: &TimeZone) -> String {
        let z = t.to_zoned(tz.clone());
        let d = z.date();
        match self {
            Period::Day => format!("day {d}"),
            Period::Week => {
                let w = d.iso_week_date();
                format!("week {}-W{:02}", w.year(), w.week())
            }
            Period::Month => format!("month {}-{:02}", d.year(), d.month()),
            Period::Year => format!("year {}", d.year()),
        }
    }
}

/// The verdicts on `points` (any order), newest first.
pub fn select(points: &[Point], r: &Retention, tz: &TimeZone) -> Vec<Verdict> {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.name.cmp(&a.name)));
    let mut out: Vec<Verdict> = sorted
        .iter()
        .map(|p| Verdict {
            name: p.name.clone(),
            time: p.time,
            kept_by: Vec::new(),
            passed_over: Vec::new(),
        })
        .collect();
    if let Some(n) = r.keep_last {
        for (i, v) in out.iter_mut().enumerate() {
            if i < n.max(0) as usize {
                v.kept_by.push(format!("keepLast {n} (number {})", i + 1));
            } else {
                v.passed_over
                    .push(format!("keepLast {n}: it is number {}", i + 1));
            }
        }
    }
    for (period, n) in [
        (Period::Day, r.keep_daily),
        (Period::Week, r.keep_weekly),
        (Period::Month, r.keep_monthly),
        (Period::Year, r.keep_yearly),
    ] {
        let Some(n) = n else { continue };
        // The newest point of each of the n newest periods that have one.
        let mut chosen: BTreeMap<(i16, i16, i8), String> = BTreeMap::new();
        let mut full = false;
        for v in out.iter_mut() {
            let key = period.key(v.time, tz);
            let what = period.describe(v.time, tz);
            if let Some(newer) = chosen.get(&key) {
                v.passed_over
                    .push(format!("{} {n}: {newer} is newer in {what}", period.rule()));
            } else if full || chosen.len() >= n.max(0) as usize {
                full = true;
                v.passed_over.push(format!(
                    "{} {n}: {what} is not among the {n} newest with a point",
                    period.rule()
                ));
            } else {
                chosen.insert(key, v.name.clone());
                v.kept_by
                    .push(format!("{} {n}: newest of {what}", period.rule()));
            }
        }
    }
    if let Some(first) = out.first_mut()
        && first.kept_by.is_empty()
    {
        first.kept_by.push("the newest point of the VM".into());
    }
    if let Some(i) = sorted.iter().position(|p| p.verified)
        && out[i].kept_by.is_empty()
    {
        out[i]
            .kept_by
            .push("the newest verified point of the VM".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn points(times: &[&str]) -> Vec<Point> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| Point {
                name: format!("p{i}"),
                time: at(t),
                verified: true,
            })
            .collect()
    }

    fn kept(v: &[Verdict]) -> Vec<String> {
        v.iter()
            .filter(|v| v.kept())
            .map(|v| v.name.clone())
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let p = points(&[
            "2026-01-01T01:00:00Z",
            "2026-01-02T01:00:00Z",
            "2026-01-03T01:00:00Z",
            "2026-01-04T01:00:00Z",
        ]);
        let r = Retention {
            keep_last: Some(2),
            ..Default::default()
        };
        let v = select(&p, &r, &TimeZone::UTC);
        assert_eq!(kept(&v), ["p3", "p2"]);
        assert!(v[0].kept_by[0].starts_with("keepLast 2"), "{v:?}");
        assert!(!v[3].kept());
    }

    #[test]
    fn gfs_keeps_the_newest_of_each_period() {
        // Two points a day, every day of 2026-01-01 .. 2026-03-10 (69 days).
        let mut times = Vec::new();
        let mut d = jiff::civil::date(2026, 1, 1);
        while d <= jiff::civil::date(2026, 3, 10) {
            times.push(format!("{d}T01:00:00Z"));
            times.push(format!("{d}T13:00:00Z"));
            d = d.tomorrow().unwrap();
        }
        let refs: Vec<&str> = times.iter().map(String::as_str).collect();
        let p = points(&refs);
        let r = Retention {
            keep_daily: Some(3),
            keep_weekly: Some(2),
            keep_monthly: Some(3),
            ..Default::default()
        };
        let v = select(&p, &r, &TimeZone::UTC);
        let kept_times: Vec<String> = v
            .iter()
            .filter(|v| v.kept())
            .map(|v| v.time.to_string())
            .collect();
        assert_eq!(
            kept_times,
            [
                // Daily: 03-10, 03-09, 03-08 (the 13:00 point of each). 03-08 is a Sunday: it
                // is also the newest of week 2026-W10, whose newest is 03-10.
                "2026-03-10T13:00:00Z", // daily, weekly W11, monthly 03
                "2026-03-09T13:00:00Z", // daily
                "2026-03-08T13:00:00Z", // daily, weekly W10
                "2026-02-28T13:00:00Z", // monthly 02
                "2026-01-31T13:00:00Z", // monthly 01
            ]
        );
        // A point that goes says why each rule passes it over.
        let gone = v
            .iter()
            .find(|v| v.time.to_string() == "2026-03-08T01:00:00Z")
            .unwrap();
        assert!(!gone.kept());
        assert_eq!(
            gone.passed_over,
            [
                "keepDaily 3: p133 is newer in day 2026-03-08",
                "keepWeekly 2: p133 is newer in week 2026-W10",
                "keepMonthly 3: p137 is newer in month 2026-03",
            ]
        );
        let old = v
            .iter()
            .find(|v| v.time.to_string() == "2026-01-10T13:00:00Z")
            .unwrap();
        assert_eq!(
            old.passed_over,
            [
                "keepDaily 3: day 2026-01-10 is not among the 3 newest with a point",
                "keepWeekly 2: week 2026-W02 is not among the 2 newest with a point",
                "keepMonthly 3: p61 is newer in month 2026-01",
            ]
        );
        let first = &v[0].kept_by;
        assert_eq!(first.len(), 3, "{first:?}");
        assert!(
            first.iter().any(|r| r.contains("week 2026-W11")),
            "{first:?}"
        );
        assert!(
            first.iter().any(|r| r.contains("month 2026-03")),
            "{first:?}"
        );
    }

    #[test]
    fn days_are_counted_in_the_retention_time_zone() {
        // 23:30 UTC on 01-01 is already 01-02 in Berlin: the two points share a Berlin day.
        let p = points(&["2026-01-01T23:30:00Z", "2026-01-02T08:00:00Z"]);
        let r = Retention {
            keep_daily: Some(2),
            ..Default::default()
        };
        assert_eq!(kept(&select(&p, &r, &TimeZone::UTC)), ["p1", "p0"]);
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        assert_eq!(kept(&select(&p, &r, &berlin)), ["p1"]);
    }

    #[test]
    fn the_newest_and_the_newest_verified_point_are_always_kept() {
        let mut p = points(&[
            "2020-01-01T00:00:00Z",
            "2026-01-01T00:00:00Z",
            "2026-01-02T00:00:00Z",
        ]);
        p[2].verified = false;
        p[1].verified = false;
        // keepYearly 1 keeps only the newest of 2026 (p2, unverified): p0 is the newest
        // verified point and stays too.
        let r = Retention {
            keep_yearly: Some(1),
            ..Default::default()
        };
        let v = select(&p, &r, &TimeZone::UTC);
        assert_eq!(kept(&v), ["p2", "p0"]);
        assert_eq!(v[2].kept_by, ["the newest verified point of the VM"]);
        assert!(select(&[], &r, &TimeZone::UTC).is_empty());
    }

    #[test]
    fn an_iso_week_spans_the_new_year() {
        // 2026-12-31 (Thu) and 2027-01-02 (Sat) are both in ISO week 2026-W53.
        let p = points(&["2026-12-31T10:00:00Z", "2027-01-02T10:00:00Z"]);
        let r = Retention {
            keep_weekly: Some(2),
            ..Default::default()
        };
        let v = select(&p, &r, &TimeZone::UTC);
        assert_eq!(kept(&v), ["p1"]);
        assert!(v[0].kept_by[0].contains("2026-W53"), "{v:?}");
    }
}
