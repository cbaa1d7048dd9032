//! Pod CIDRs and overlap detection between clusters.
//!
//! Connected clusters route pod traffic to each other by pod IP, so a pod IP must
//! identify one cluster: the pod CIDRs of different clusters must not overlap. The API
//! server validates its own CIDRs with [`Cidr::parse`]; the CLI and agents compare the
//! cluster configs of a mesh with [`find_overlaps`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 network in canonical form (no host bits set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a CIDR string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not of the form `address/length`.
    #[error("invalid CIDR {0:?}: expected ADDRESS/LENGTH such as 10.0.0.0/16 or fd00::/64")]
    Syntax(String),
    /// The address part is not an IP address.
    #[error("invalid CIDR {0:?}: the address is not an IPv4 or IPv6 address")]
    Address(String),
    /// The prefix length is not a number within the family's range.
    #[error("invalid CIDR {input:?}: prefix length must be 0..={max}")]
    PrefixLen {
        /// The rejected input.
        input: String,
        /// 32 or 128.
        max: u8,
    },
    /// Bits beyond the prefix are set.
    #[error("invalid CIDR {input:?}: host bits are set; did you mean {canonical}?")]
    HostBits {
        /// The rejected input.
        input: String,
        /// The network the input lies in.
        canonical: Cidr,
    },
}

impl Cidr {
    /// The single-address network of `addr` (/32 or /128).
    #[must_use]
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix_len }
    }

    /// Parses `addr/len`, rejecting host bits.
    ///
    /// # Errors
    /// [`CidrError`] naming the input and the problem.
    pub fn parse(input: &str) -> Result<Cidr, CidrError> {
        let (addr, len) = input
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(input.to_owned()))?;
        let addr = IpAddr::from_str(addr).map_err(|_| CidrError::Address(input.to_owned()))?;
        let max = max_len(addr);
        let prefix_len =
            if !len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit()) {
                len.parse::<u8>().ok().filter(|l| *l <= max)
            } else {
                None
            }
            .ok_or_else(|| CidrError::PrefixLen {
                input: input.to_owned(),
                max,
            })?;
        let canonical = Cidr {
            addr: mask(addr, prefix_len),
            prefix_len,
        };
        if canonical.addr != addr {
            return Err(CidrError::HostBits {
                input: input.to_owned(),
                canonical,
            });
        }
        Ok(canonical)
    }

    /// The network address.
    #[must_use]
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    #[must_use]
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// True when `ip` lies in this network.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }

    /// True when the two networks share at least one address (same family and one
    /// contains the other's network address at the shorter prefix).
    #[must_use]
    pub fn overlaps(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let len = self.prefix_len.min(other.prefix_len);
        mask(self.addr, len) == mask(other.addr, len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cidr::parse(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

/// Two clusters whose pod CIDRs overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrOverlap {
    /// First cluster.
    pub cluster_a: String,
    /// Its overlapping CIDR.
    pub cidr_a: Cidr,
    /// Second cluster.
    pub cluster_b: String,
    /// Its overlapping CIDR.
    pub cidr_b: Cidr,
}

impl fmt::Display for CidrOverlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod CIDR {} of cluster {} overlaps pod CIDR {} of cluster {}; pod IPs must be unique across the mesh",
            self.cidr_a, self.cluster_a, self.cidr_b, self.cluster_b
        )
    }
}

/// Every overlapping pair of pod CIDRs between *different* clusters (overlaps within one
/// cluster are that cluster's business). Quadratic in the number of CIDRs, which is small
/// (a few per cluster, at most 511 clusters).
#[must_use]
pub fn find_overlaps(clusters: &[(String, Vec<Cidr>)]) -> Vec<CidrOverlap> {
    let mut out = Vec::new();
    for (i, (name_a, cidrs_a)) in clusters.iter().enumerate() {
        for (name_b, cidrs_b) in &clusters[i + 1..] {
            if name_a == name_b {
                continue;
            }
            for a in cidrs_a {
                for b in cidrs_b {
                    if a.overlaps(b) {
                        out.push(CidrOverlap {
                            cluster_a: name_a.clone(),
                            cidr_a: *a,
                            cluster_b: name_b.clone(),
                            cidr_b: *b,
                        });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn parses_v4_and_v6() {
        assert_eq!(c("10.0.0.0/16").to_string(), "10.0.0.0/16");
        assert_eq!(c("fd00:10::/64").to_string(), "fd00:10::/64");
        assert_eq!(c("0.0.0.0/0").prefix_len(), 0);
        assert_eq!(c("::/0").prefix_len(), 0);
        assert_eq!(c("10.1.2.3/32").prefix_len(), 32);
    }

    #[test]
    fn rejects_malformed_cidrs() {
        assert!(matches!(Cidr::parse("10.0.0.0"), Err(CidrError::Syntax(_))));
        assert!(matches!(
            Cidr::parse("10.0.0/8"),
            Err(CidrError::Address(_))
        ));
        assert!(matches!(
            Cidr::parse("10.0.0.0/33"),
            Err(CidrError::PrefixLen { .. })
        ));
        assert!(matches!(
            Cidr::parse("fd00::/129"),
            Err(CidrError::PrefixLen { .. })
        ));
        assert!(matches!(
            Cidr::parse("10.0.0.0/+8"),
            Err(CidrError::PrefixLen { .. })
        ));
        assert!(matches!(
            Cidr::parse("10.0.0.0/"),
            Err(CidrError::PrefixLen { .. })
        ));
        let err = Cidr::parse("10.0.0.1/16").unwrap_err();
        assert!(err.to_string().contains("10.0.0.0/16"), "{err}");
    }

    #[test]
    fn overlap_is_family_aware() {
        assert!(c("10.0.0.0/8").overlaps(&c("10.20.0.0/16")));
        assert!(c("10.20.0.0/16").overlaps(&c("10.0.0.0/8")));
        assert!(!c("10.0.0.0/16").overlaps(&c("10.1.0.0/16")));
        assert!(c("fd00::/48").overlaps(&c("fd00:0:0:1::/64")));
        assert!(!c("fd00::/64").overlaps(&c("fd01::/64")));
        assert!(!c("0.0.0.0/0").overlaps(&c("::/0")));
    }

    #[test]
    fn finds_overlaps_only_between_clusters() {
        let clusters = vec![
            (
                "a".to_owned(),
                vec![c("10.0.0.0/16"), c("10.0.0.0/17"), c("fd00:a::/64")],
            ),
            ("b".to_owned(), vec![c("10.1.0.0/16"), c("fd00:b::/64")]),
            ("c".to_owned(), vec![c("10.0.128.0/24"), c("fd00::/16")]),
        ];
        let overlaps = find_overlaps(&clusters);
        let pairs: Vec<_> = overlaps
            .iter()
            .map(|o| format!("{}:{}~{}:{}", o.cluster_a, o.cidr_a, o.cluster_b, o.cidr_b))
            .collect();
        assert_eq!(
            pairs,
            [
                "a:10.0.0.0/16~c:10.0.128.0/24",
                "a:fd00:a::/64~c:fd00::/16",
                "b:fd00:b::/64~c:fd00::/16",
            ]
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,60}") {
            let _ = Cidr::parse(&s);
        }

        #[test]
        fn overlap_agrees_with_containment(a in any::<u32>(), la in 0u8..=32, b in any::<u32>(), lb in 0u8..=32) {
            let na = Cidr { addr: mask(IpAddr::V4(a.into()), la), prefix_len: la };
            let nb = Cidr { addr: mask(IpAddr::V4(b.into()), lb), prefix_len: lb };
            let expected = na.contains(nb.addr()) || nb.contains(na.addr());
            prop_assert_eq!(na.overlaps(&nb), expected);
            prop_assert_eq!(na.overlaps(&nb), nb.overlaps(&na));
        }
    }
}
