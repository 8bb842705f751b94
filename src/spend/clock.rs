//! The UTC day budgets and the ledger count by, on tokio's clock: the wall clock read once,
//! then advanced by tokio's `Instant`, so a test with a paused clock can roll the day over.
//! The calendar arithmetic is Howard Hinnant's `civil_from_days` / `days_from_civil`, by hand:
//! two small functions, where a date crate would be a dependency for them alone.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

const DAY: u64 = 86_400;

/// Unix time on tokio's clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    unix_at_start: Duration,
    start: Instant,
}

impl Clock {
    /// The wall clock, now.
    pub fn system() -> Clock {
        Clock::at(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        )
    }

    /// A clock reading `unix` now (tests).
    pub fn at(unix: Duration) -> Clock {
        Clock {
            unix_at_start: unix,
            start: Instant::now(),
        }
    }

    fn now(&self) -> Duration {
        self.unix_at_start + self.start.elapsed()
    }

    /// Today, as days since 1970-01-01 (UTC).
    pub fn day(&self) -> u32 {
        u32::try_from(self.now().as_secs() / DAY).unwrap_or(u32::MAX)
    }

    /// Until 00:00 UTC tomorrow, when the budgets reset.
    pub fn until_tomorrow(&self) -> Duration {
        let now = self.now();
        Duration::from_secs((now.as_secs() / DAY + 1) * DAY).saturating_sub(now)
    }
}

/// `day` (days since 1970-01-01) as `YYYY-MM-DD`.
pub fn date(day: u32) -> String {
    let z = i64::from(day) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD` as days since 1970-01-01; `None` when it is not such a date.
pub fn parse_date(s: &str) -> Option<u32> {
    let mut parts = s.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (parts.next()??, parts.next()??, parts.next()??);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let day = u32::try_from(era * 146_097 + doe - 719_468).ok()?;
    // 2026-02-31 would land in March: only a date that reads back the same is one.
    (date(day) == s).then_some(day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_read_back() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(20_427), "2025-12-05");
        assert_eq!(parse_date("2025-12-05"), Some(20_427));
        assert_eq!(
            parse_date("2024-02-29").map(date).as_deref(),
            Some("2024-02-29")
        );
        assert_eq!(parse_date("2026-02-31"), None);
        assert_eq!(parse_date("yesterday"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_day_rolls_over_at_midnight_utc() {
        let clock = Clock::at(Duration::from_secs(20_427 * DAY + DAY - 90));
        assert_eq!(date(clock.day()), "2025-12-05");
        assert_eq!(clock.until_tomorrow(), Duration::from_secs(90));
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(date(clock.day()), "2025-12-06");
        assert_eq!(clock.until_tomorrow(), Duration::from_secs(DAY));
    }
}
