//! Which of the school's services a process runs.

use std::fmt;
use std::str::FromStr;

/// A service of the reference system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// `POST /enrollments` and the enrollment state machine.
    Enrollment,
    /// The fraud check.
    Antifraud,
    /// Charges and refunds through the payment gateway.
    Billing,
    /// Payment metrics.
    Metrics,
    /// `POST /contact`.
    Contact,
    /// Sends mail.
    Mailer,
    /// Tells students what failed.
    Notifier,
}

impl Service {
    /// Every service, in the order they are started.
    pub const ALL: [Service; 7] = [
        Service::Enrollment,
        Service::Antifraud,
        Service::Billing,
        Service::Metrics,
        Service::Contact,
        Service::Mailer,
        Service::Notifier,
    ];

    /// Its name on the command line and in the data directory.
    pub fn name(self) -> &'static str {
        match self {
            Service::Enrollment => "enrollment",
            Service::Antifraud => "antifraud",
            Service::Billing => "billing",
            Service::Metrics => "metrics",
            Service::Contact => "contact",
            Service::Mailer => "mailer",
            Service::Notifier => "notifier",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of services, written `enrollment,contact` (or `all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Services(Vec<Service>);

impl Services {
    /// Every service: what `eventos up` runs.
    pub fn all() -> Self {
        Self(Service::ALL.to_vec())
    }

    /// Whether `service` is in the set.
    pub fn contains(&self, service: Service) -> bool {
        self.0.contains(&service)
    }

    /// The services, in start order.
    pub fn iter(&self) -> impl Iterator<Item = Service> + '_ {
        self.0.iter().copied()
    }
}

impl Default for Services {
    fn default() -> Self {
        Self::all()
    }
}

impl fmt::Display for Services {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.0.iter().map(|s| s.name()).collect();
        f.write_str(&names.join(","))
    }
}

impl FromStr for Services {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "all" {
            return Ok(Self::all());
        }
        let mut chosen = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let service = Service::ALL
                .into_iter()
                .find(|s| s.name() == name)
                .ok_or_else(|| {
                    format!(
                        "unknown service {name:?}; choose from {} (comma-separated) or all",
                        Services::all()
                    )
                })?;
            if !chosen.contains(&service) {
                chosen.push(service);
            }
        }
        if chosen.is_empty() {
            return Err(format!(
                "no service named; choose from {} (comma-separated) or all",
                Services::all()
            ));
        }
        chosen.sort();
        Ok(Self(chosen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_in_start_order_and_mistakes_are_named() {
        let s: Services = "contact, enrollment,contact".parse().unwrap();
        assert_eq!(s.to_string(), "enrollment,contact");
        assert_eq!("all".parse::<Services>().unwrap(), Services::all());
        let e = "enrolment".parse::<Services>().unwrap_err();
        assert!(
            e.contains("\"enrolment\"") && e.contains("antifraud"),
            "{e}"
        );
        assert!("".parse::<Services>().is_err());
    }
}
