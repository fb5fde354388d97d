//! What a metric rule asks of the Monitor (paper §2.2.2): the metric to
//! optimise, which overlays it may pick besides the underlay, and whether
//! a monitor module decides instead of the built-in one.

use std::fmt;
use std::str::FromStr;

/// Longest metric text: it travels in the shim of a monitor module
/// module, whose shim is at most this long.
pub const MAX_METRIC_LEN: usize = oasis_common::MAX_SHIM_LEN;

/// What the built-in Monitor optimises for a rule's flows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// The lowest round-trip time.
    Latency,
    /// Stay on the underlay unless its loss reaches `max`; then the
    /// carrier with the lowest loss.
    Loss { max: LossLimit },
    /// The highest goodput.
    Throughput,
    /// Text only a monitor module understands; passed to it as
    /// it was written.
    Other(String),
}

/// A loss rate in hundredths of a percent (`loss<1.5%` is 150), so a rule
/// stays an exact, hashable value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LossLimit(pub u32);

impl LossLimit {
    pub fn fraction(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }
}

impl fmt::Display for LossLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, part) = (self.0 / 100, self.0 % 100);
        match part {
            0 => write!(f, "{whole}%"),
            p if p % 10 == 0 => write!(f, "{whole}.{}%", p / 10),
            p => write!(f, "{whole}.{p:02}%"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricError {
    #[error("empty metric: use latency, throughput or loss<X% (e.g. loss<1%)")]
    Empty,
    #[error(
        "unknown metric {0:?}: the built-in Monitor knows latency, throughput and loss<X% (e.g. loss<1%); \
         other text is for a monitor module (--monitor NAME)"
    )]
    Unknown(String),
    #[error(
        "bad loss limit {0:?}: give a percentage above 0 and below 100 with at most two decimals, e.g. loss<1% or loss<0.5%"
    )]
    BadLoss(String),
    #[error("the metric is {0} bytes; it travels in a shim of at most {MAX_METRIC_LEN} bytes")]
    TooLong(usize),
    #[error("the metric may hold printable ASCII only (it travels in a shim)")]
    NotPrintable,
}

impl Metric {
    /// Parses a metric for the built-in Monitor (`external` false) or for
    /// an external module, which takes any short printable text.
    pub fn parse(text: &str, external: bool) -> Result<Metric, MetricError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(MetricError::Empty);
        }
        if text.len() > MAX_METRIC_LEN {
            return Err(MetricError::TooLong(text.len()));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(MetricError::NotPrintable);
        }
        let lower = text.to_ascii_lowercase();
        match lower.as_str() {
            "latency" => return Ok(Metric::Latency),
            "throughput" => return Ok(Metric::Throughput),
            _ => {}
        }
        if let Some(limit) = lower.strip_prefix("loss<") {
            return parse_loss(limit)
                .map(|max| Metric::Loss { max })
                .ok_or_else(|| MetricError::BadLoss(text.into()));
        }
        if external {
            Ok(Metric::Other(text.into()))
        } else {
            Err(MetricError::Unknown(text.into()))
        }
    }
}

/// `1%`, `0.5%`, `2.25%` (the `%` may be left out).
fn parse_loss(text: &str) -> Option<LossLimit> {
    let number = text.trim().strip_suffix('%').unwrap_or(text).trim();
    let (whole, part) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && part.is_empty() || part.len() > 2 {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(part) {
        return None;
    }
    let whole: u32 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let part: u32 = format!("{part:0<2}").parse().ok()?;
    let hundredths = whole.checked_mul(100)?.checked_add(part)?;
    (1..10_000).contains(&hundredths).then_some(LossLimit(hundredths))
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Metric::Latency => f.write_str("latency"),
            Metric::Throughput => f.write_str("throughput"),
            Metric::Loss { max } => write!(f, "loss<{max}"),
            Metric::Other(text) => f.write_str(text),
        }
    }
}

impl FromStr for Metric {
    type Err = MetricError;
    fn from_str(s: &str) -> Result<Metric, MetricError> {
        Metric::parse(s, false)
    }
}

/// A metric rule's carrier: the Monitor, with what it optimises.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Goal {
    pub metric: Metric,
    /// The overlays the Monitor may choose besides the underlay (which is
    /// always a candidate); None: every joined overlay.
    pub among: Option<Vec<String>>,
    /// A joined overlay whose monitor module decides instead of the
    /// built-in Monitor.
    pub module: Option<String>,
}

impl Goal {
    /// Every overlay the goal names.
    pub fn overlays(&self) -> impl Iterator<Item = &str> {
        self.among
            .iter()
            .flatten()
            .map(String::as_str)
            .chain(self.module.as_deref())
    }
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.module {
            Some(module) => write!(f, "monitor {module}: {}", self.metric)?,
            None => write!(f, "monitor: {}", self.metric)?,
        }
        if let Some(among) = &self.among {
            write!(f, " among {}", among.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_print_back() {
        for (text, metric) in [
            ("latency", Metric::Latency),
            ("Throughput", Metric::Throughput),
            ("loss<1%", Metric::Loss { max: LossLimit(100) }),
            ("loss<0.5%", Metric::Loss { max: LossLimit(50) }),
            ("loss<2.25", Metric::Loss { max: LossLimit(225) }),
            ("loss<.1%", Metric::Loss { max: LossLimit(10) }),
        ] {
            assert_eq!(Metric::parse(text, false), Ok(metric.clone()), "{text}");
            assert_eq!(Metric::parse(&metric.to_string(), false), Ok(metric));
        }
        assert_eq!(Metric::Loss { max: LossLimit(150) }.to_string(), "loss<1.5%");
        assert_eq!(Metric::Loss { max: LossLimit(5) }.to_string(), "loss<0.05%");
    }

    #[test]
    fn bad_metrics_are_refused_with_the_reason() {
        assert_eq!(Metric::parse("", false), Err(MetricError::Empty));
        assert!(matches!(
            Metric::parse("jitter", false),
            Err(MetricError::Unknown(_))
        ));
        for bad in [
            "loss<0%",
            "loss<100%",
            "loss<abc",
            "loss<1.234%",
            "loss<",
            "loss<-1%",
        ] {
            assert!(
                matches!(Metric::parse(bad, false), Err(MetricError::BadLoss(_))),
                "{bad}"
            );
        }
        assert_eq!(
            Metric::parse(&"x".repeat(65), true),
            Err(MetricError::TooLong(65))
        );
        assert_eq!(Metric::parse("lat\u{7}", true), Err(MetricError::NotPrintable));
        // An external module takes its own words.
        assert_eq!(
            Metric::parse("jitter<5ms", true),
            Ok(Metric::Other("jitter<5ms".into()))
        );
    }

    #[test]
    fn goals_name_their_overlays() {
        let goal = Goal {
            metric: Metric::Latency,
            among: Some(vec!["a".into(), "b".into()]),
            module: Some("m".into()),
        };
        assert_eq!(goal.overlays().collect::<Vec<_>>(), ["a", "b", "m"]);
        assert_eq!(goal.to_string(), "monitor m: latency among a,b");
    }
}
