//! What a sharer offers and a requester wants: services (a small set),
//! the uplink's network type, and link security.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Hotspot,
    Wifi6,
    FiveGhz,
    Prose,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Hotspot,
        Service::Wifi6,
        Service::FiveGhz,
        Service::Prose,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Service::Hotspot => "hotspot",
            Service::Wifi6 => "wifi6",
            Service::FiveGhz => "5ghz",
            Service::Prose => "prose",
        }
    }

    fn bit(&self) -> u8 {
        match self {
            Service::Hotspot => 1,
            Service::Wifi6 => 2,
            Service::FiveGhz => 4,
            Service::Prose => 8,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown service {0:?}: expected a comma-separated list of hotspot, wifi6, 5ghz, prose")]
pub struct UnknownService(pub String);

impl FromStr for Service {
    type Err = UnknownService;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let l = s.trim().to_ascii_lowercase();
        Service::ALL
            .into_iter()
            .find(|v| v.as_str() == l)
            .ok_or_else(|| UnknownService(s.to_string()))
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of services as a bit set: cheap to store per sharer and to test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceSet(u8);

impl ServiceSet {
    pub fn insert(&mut self, s: Service) {
        self.0 |= s.bit();
    }
    pub fn contains(&self, s: Service) -> bool {
        self.0 & s.bit() != 0
    }
    /// The services of `wanted` that `self` lacks.
    pub fn missing(&self, wanted: ServiceSet) -> ServiceSet {
        ServiceSet(wanted.0 & !self.0)
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = Service> + '_ {
        Service::ALL.into_iter().filter(|s| self.contains(*s))
    }
}

impl FromIterator<Service> for ServiceSet {
    fn from_iter<I: IntoIterator<Item = Service>>(iter: I) -> Self {
        let mut set = ServiceSet::default();
        for s in iter {
            set.insert(s);
        }
        set
    }
}

impl FromStr for ServiceSet {
    type Err = UnknownService;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(str::parse)
            .collect()
    }
}

impl fmt::Display for ServiceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(|s| s.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

/// The kind of uplink a sharer relays over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetworkType {
    FiveG,
    FourG,
    Wifi,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown network type {0:?}: expected 5g, 4g or wifi")]
pub struct UnknownNetwork(pub String);

impl NetworkType {
    pub fn as_str(&self) -> &'static str {
        match self {
            NetworkType::FiveG => "5g",
            NetworkType::FourG => "4g",
            NetworkType::Wifi => "wifi",
        }
    }
}

impl FromStr for NetworkType {
    type Err = UnknownNetwork;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "5g" => Ok(NetworkType::FiveG),
            "4g" | "lte" => Ok(NetworkType::FourG),
            "wifi" => Ok(NetworkType::Wifi),
            _ => Err(UnknownNetwork(s.to_string())),
        }
    }
}

impl fmt::Display for NetworkType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a sharer's Wi-Fi hotspot is secured, weakest first: a requester
/// asks for at least one of these (`--security wpa2` takes WPA2 or WPA3).
/// Flows are end-to-end QUIC either way; this is the radio link's own
/// protection, for a device that joins the hotspot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Security {
    Open,
    Wpa2,
    Wpa3,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown security {0:?}: expected open, wpa2 or wpa3")]
pub struct UnknownSecurity(pub String);

impl Security {
    pub fn as_str(&self) -> &'static str {
        match self {
            Security::Open => "open",
            Security::Wpa2 => "wpa2",
            Security::Wpa3 => "wpa3",
        }
    }
}

impl FromStr for Security {
    type Err = UnknownSecurity;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "open" => Ok(Security::Open),
            "wpa2" => Ok(Security::Wpa2),
            "wpa3" => Ok(Security::Wpa3),
            _ => Err(UnknownSecurity(s.to_string())),
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets() {
        let have: ServiceSet = "hotspot,5ghz".parse().expect("valid");
        let want: ServiceSet = "5ghz,wifi6".parse().expect("valid");
        assert_eq!(have.missing(want).to_string(), "wifi6");
        assert!(have.missing("hotspot".parse().expect("valid")).is_empty());
        assert_eq!("".parse::<ServiceSet>(), Ok(ServiceSet::default()));
        assert_eq!(
            "hotspot,teleport".parse::<ServiceSet>(),
            Err(UnknownService("teleport".into()))
        );
    }

    #[test]
    fn networks() {
        assert_eq!("5G".parse(), Ok(NetworkType::FiveG));
        assert!("3g".parse::<NetworkType>().is_err());
    }

    #[test]
    fn security_is_ordered_and_parsed() {
        assert!(Security::Open < Security::Wpa2 && Security::Wpa2 < Security::Wpa3);
        for s in [Security::Open, Security::Wpa2, Security::Wpa3] {
            assert_eq!(s.as_str().parse::<Security>(), Ok(s));
        }
        assert!("wep".parse::<Security>().is_err());
    }
}
