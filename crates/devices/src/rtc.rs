//! The MC146818-style CMOS real-time clock at ports 0x70/0x71.
//!
//! Linux reads the wall clock from it at boot and its rtc_cmos driver probes it; without it the
//! kernel waits out timeouts. The time registers always show the host's current UTC time and
//! the update-in-progress flag is never set, so every read succeeds at once. Setting the clock
//! is ignored: the written bytes are stored but reads keep showing host time. No RTC interrupt
//! is ever raised.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::persist::{Persist, PersistError};
use crate::{PioDevice, read_bytewise, write_bytewise};

/// Index port; the data port follows it.
pub const RTC_PORT: u16 = 0x70;
/// Ports 0x70 (index) and 0x71 (data).
pub const RTC_LEN: u16 = 2;
/// The ISA IRQ of the RTC (its interrupts are not emulated, but the driver requests the line).
pub const RTC_IRQ: u32 = 8;

const INDEX: u16 = 0;
const DATA: u16 = 1;
/// Bit 7 of the index port gates NMIs on a PC; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;
const CMOS_SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz periodic rate.
const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UIP: u8 = 0x80;
/// Register B: BCD, 24-hour mode, no interrupts enabled.
const REG_B_DEFAULT: u8 = 0x02;
const REG_B_24_HOUR: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
/// Register D: valid RAM and time (the battery is fine).
const REG_D_VALID: u8 = 0x80;
/// Bit 7 of the hours register marks PM in 12-hour mode.
const HOURS_PM: u8 = 0x80;

/// A calendar date and time of day, in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    /// 0 = Sunday.
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    fn from_unix(secs: u64) -> DateTime {
        let days = (secs / 86_400) as i64;
        let in_day = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            // 1970-01-01 was a Thursday.
            weekday: ((days + 4).rem_euclid(7)) as u8,
            hour: (in_day / 3600) as u8,
            minute: (in_day / 60 % 60) as u8,
            second: (in_day % 60) as u8,
        }
    }
}

/// The proleptic Gregorian date `days` after 1970-01-01, as (year, month 1-12, day 1-31).
///
/// Howard Hinnant's `civil_from_days`: count 400-year eras of 146,097 days from 0000-03-01, so
/// the leap day is the last day of each shifted year.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// The CMOS RTC and its 128 bytes of RAM.
pub struct CmosRtc {
    index: u8,
    cmos: [u8; CMOS_SIZE],
    /// Set once a host clock before 1970 has been reported.
    clock_error_logged: bool,
}

impl Default for CmosRtc {
    fn default() -> Self {
        Self::new()
    }
}

impl CmosRtc {
    /// A clock in BCD, 24-hour mode, with valid RAM and the rest of the CMOS zeroed (the guest
    /// learns its memory from e820, not from CMOS).
    pub fn new() -> CmosRtc {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[usize::from(REG_A)] = REG_A_DEFAULT;
        cmos[usize::from(REG_B)] = REG_B_DEFAULT;
        cmos[usize::from(REG_D)] = REG_D_VALID;
        CmosRtc {
            index: 0,
            cmos,
            clock_error_logged: false,
        }
    }

    fn now(&mut self) -> DateTime {
        let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(elapsed) => elapsed.as_secs(),
            Err(_) => {
                if !std::mem::replace(&mut self.clock_error_logged, true) {
                    log::warn!("CMOS RTC: host clock is before 1970; the guest sees 1970-01-01");
                }
                0
            }
        };
        DateTime::from_unix(secs)
    }

    /// Encodes a time field the way register B asks for: BCD or binary.
    fn encode(&self, value: u8) -> u8 {
        if self.cmos[usize::from(REG_B)] & REG_B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    fn encode_hours(&self, hour: u8) -> u8 {
        if self.cmos[usize::from(REG_B)] & REG_B_24_HOUR != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    /// The current host time in the format register B asks for, if `reg` is a time register.
    fn time_register(&mut self, reg: u8) -> Option<u8> {
        let field: fn(&DateTime) -> u8 = match reg {
            REG_SECONDS => |t| t.second,
            REG_MINUTES => |t| t.minute,
            REG_HOURS => {
                let hour = self.now().hour;
                return Some(self.encode_hours(hour));
            }
            REG_DAY_OF_WEEK => |t| t.weekday + 1,
            REG_DAY_OF_MONTH => |t| t.day,
            REG_MONTH => |t| t.month,
            REG_YEAR => |t| t.year.rem_euclid(100) as u8,
            REG_CENTURY => |t| t.year.div_euclid(100).rem_euclid(100) as u8,
            _ => return None,
        };
        let value = field(&self.now());
        Some(self.encode(value))
    }

    fn read_data(&mut self) -> u8 {
        match self.index {
            // No update is ever in progress, so a reader never has to wait.
            REG_A => self.cmos[usize::from(REG_A)] & !REG_A_UIP,
            // No interrupt is ever pending.
            REG_C => 0,
            REG_D => REG_D_VALID,
            reg => self
                .time_register(reg)
                .unwrap_or(self.cmos[usize::from(reg)]),
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.index {
            // Read-only status registers.
            REG_C | REG_D => {}
            reg => self.cmos[usize::from(reg)] = value,
        }
    }
}

/// `rtc` version 1: the index register and the 128 CMOS bytes. The time registers are not
/// state: they are read from the host clock, so a restored guest sees the time of day now
/// (its kvmclock, restored with the irqchip, keeps its own time consistent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcStateV1 {
    pub index: u8,
    pub cmos: Vec<u8>,
}

impl Persist for CmosRtc {
    type State = RtcStateV1;
    const VERSION: u32 = 1;
    const NAME: &'static str = "CMOS RTC";

    fn save(&self) -> Result<RtcStateV1, PersistError> {
        Ok(RtcStateV1 {
            index: self.index,
            cmos: self.cmos.to_vec(),
        })
    }

    fn restore(&mut self, state: RtcStateV1) -> Result<(), PersistError> {
        let cmos: [u8; CMOS_SIZE] =
            state
                .cmos
                .as_slice()
                .try_into()
                .map_err(|_| PersistError::Mismatch {
                    device: Self::NAME,
                    detail: format!("{} CMOS bytes, expected {CMOS_SIZE}", state.cmos.len()),
                })?;
        self.index = state.index & INDEX_MASK;
        self.cmos = cmos;
        Ok(())
    }
}

impl PioDevice for CmosRtc {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        read_bytewise(offset, data, |off| match off {
            INDEX => self.index,
            DATA => self.read_data(),
            _ => 0xff,
        });
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        write_bytewise(offset, data, |off, value| match off {
            INDEX => self.index = value & INDEX_MASK,
            DATA => self.write_data(value),
            _ => {}
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hinnant's `days_from_civil`, the inverse of [`civil_from_days`], to check it.
    fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
        let (month, day) = (i64::from(month), i64::from(day));
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = (month + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    fn from_bcd(value: u8) -> u8 {
        (value >> 4) * 10 + (value & 0x0f)
    }

    fn read_reg(rtc: &mut CmosRtc, reg: u8) -> u8 {
        rtc.write(INDEX, &[reg]);
        let mut data = [0u8];
        rtc.read(DATA, &mut data);
        data[0]
    }

    fn unix_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("host clock after 1970")
            .as_secs()
    }

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
    }

    #[test]
    fn known_weekdays_and_times() {
        // 1970-01-01 00:00:00 was a Thursday.
        let epoch = DateTime::from_unix(0);
        assert_eq!(
            (epoch.weekday, epoch.hour, epoch.minute, epoch.second),
            (4, 0, 0, 0)
        );
        // 2000-02-29 23:59:59 was a Tuesday.
        let leap = DateTime::from_unix(951_868_799);
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
        assert_eq!(
            (leap.weekday, leap.hour, leap.minute, leap.second),
            (2, 23, 59, 59)
        );
        // 2026-11-25 is a Wednesday.
        assert_eq!(DateTime::from_unix(20_782 * 86_400).weekday, 3);
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn bcd_time_matches_host_clock() {
        let mut rtc = CmosRtc::new();
        let before = unix_now();
        let field = |rtc: &mut CmosRtc, reg| from_bcd(read_reg(rtc, reg));
        let second = field(&mut rtc, REG_SECONDS);
        let minute = field(&mut rtc, REG_MINUTES);
        let hour = field(&mut rtc, REG_HOURS);
        let day = field(&mut rtc, REG_DAY_OF_MONTH);
        let month = field(&mut rtc, REG_MONTH);
        let year = field(&mut rtc, REG_YEAR);
        let century = field(&mut rtc, REG_CENTURY);
        let weekday = field(&mut rtc, REG_DAY_OF_WEEK);
        let after = unix_now();

        let year = i64::from(century) * 100 + i64::from(year);
        let days = days_from_civil(year, month, day);
        let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60;
        let secs = secs + i64::from(second);
        // Fields are read one by one, so a second may tick between them.
        let (lo, hi) = (before as i64 - 2, after as i64 + 2);
        assert!((lo..=hi).contains(&secs), "{secs} not in {lo}..={hi}");
        assert_eq!(i64::from(weekday), (days + 4).rem_euclid(7) + 1);
    }

    #[test]
    fn status_registers() {
        let mut rtc = CmosRtc::new();
        assert_eq!(read_reg(&mut rtc, REG_A), REG_A_DEFAULT);
        assert_eq!(read_reg(&mut rtc, REG_B), REG_B_DEFAULT);
        assert_eq!(read_reg(&mut rtc, REG_C), 0);
        assert_eq!(read_reg(&mut rtc, REG_D), REG_D_VALID);
        // The guest cannot make an update look in progress or invalidate the RAM.
        for (reg, value) in [(REG_A, 0xa6), (REG_C, 0xf0), (REG_D, 0x00)] {
            rtc.write(INDEX, &[reg]);
            rtc.write(DATA, &[value]);
        }
        assert_eq!(read_reg(&mut rtc, REG_A), 0x26);
        assert_eq!(read_reg(&mut rtc, REG_C), 0);
        assert_eq!(read_reg(&mut rtc, REG_D), REG_D_VALID);
    }

    #[test]
    fn index_masks_nmi_bit() {
        let mut rtc = CmosRtc::new();
        rtc.write(INDEX, &[0x80 | REG_D]);
        let mut data = [0u8];
        rtc.read(INDEX, &mut data);
        assert_eq!(data, [REG_D]);
        rtc.read(DATA, &mut data);
        assert_eq!(data, [REG_D_VALID]);
    }

    #[test]
    fn cmos_ram_and_time_writes_are_stored() {
        let mut rtc = CmosRtc::new();
        // A 16-bit write puts the index then the value, as two byte cycles would.
        rtc.write(INDEX, &[0x40, 0x5a]);
        assert_eq!(read_reg(&mut rtc, 0x40), 0x5a);
        rtc.write(INDEX, &[0xff, 0x33]);
        assert_eq!(read_reg(&mut rtc, 0x7f), 0x33);
        // Setting the clock is stored but reads keep showing host time.
        rtc.write(INDEX, &[REG_YEAR, 0x99]);
        assert_eq!(rtc.cmos[usize::from(REG_YEAR)], 0x99);
        let year = (unix_now() / 86_400) as i64;
        let year = civil_from_days(year).0.rem_euclid(100) as u8;
        assert_eq!(read_reg(&mut rtc, REG_YEAR), to_bcd(year));
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let mut rtc = CmosRtc::new();
        rtc.write(INDEX, &[REG_B, REG_B_BINARY | REG_B_24_HOUR]);
        rtc.write(INDEX, &[REG_CENTURY]);
        let mut data = [0u8];
        rtc.read(DATA, &mut data);
        assert_eq!(data[0], 20, "binary century");

        rtc.write(INDEX, &[REG_B, 0]);
        assert_eq!(rtc.encode_hours(0), 0x12);
        assert_eq!(rtc.encode_hours(11), 0x11);
        assert_eq!(rtc.encode_hours(12), 0x12 | HOURS_PM);
        assert_eq!(rtc.encode_hours(23), 0x11 | HOURS_PM);
    }

    #[test]
    fn state_round_trips_and_bad_states_are_refused() {
        use crate::persist::DeviceState;
        let mut rtc = CmosRtc::new();
        rtc.write(INDEX, &[0x40, 0x77]);
        rtc.write(INDEX, &[REG_B, REG_B_BINARY | REG_B_24_HOUR]);
        rtc.write(INDEX, &[0x41]);
        let bytes = rtc.save_state().expect("save");
        let mut fresh = CmosRtc::new();
        fresh.restore_state(1, &bytes).expect("restore");
        assert_eq!(fresh.save_state().expect("save"), bytes);
        let mut data = [0u8];
        fresh.read(INDEX, &mut data);
        assert_eq!(data, [0x41], "index register");
        assert_eq!(read_reg(&mut fresh, 0x40), 0x77);
        assert_eq!(read_reg(&mut fresh, REG_CENTURY), 20, "binary mode kept");
        let short = crate::persist::encode::<CmosRtc>(&RtcStateV1 {
            index: 0,
            cmos: vec![0; 12],
        })
        .expect("encode");
        assert!(fresh.restore_state(1, &short).is_err());
        assert!(fresh.restore_state(1, &bytes[..7]).is_err());
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut rtc = CmosRtc::default();
        for offset in [0, 1, 2, 0xfffe, 0xffff] {
            for len in [0, 1, 2, 4] {
                let mut data = vec![0xffu8; len];
                rtc.read(offset, &mut data);
                rtc.write(offset, &data);
            }
        }
        let mut data = [0u8; 2];
        rtc.read(2, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }
}
