//! What a root file system image contains: the Debian release, the package set, the mirror,
//! and the name of its cached copy.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::RootfsError;

/// The Debian release every image is built from (the guest kernel's release too).
pub const SUITE: &str = "bookworm";
/// debootstrap's smallest variant: essential packages and apt only.
pub const VARIANT: &str = "minbase";
/// Installed unless `--no-default-packages`: what an HPC job needs to start MPI programs.
pub const DEFAULT_PACKAGES: &[&str] = &["openmpi-bin"];
/// Used when no apt source for [`SUITE`] names a mirror.
pub const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// Bumped whenever the build changes what lands in an image for the same packages, so cached
/// images of an older build are not reused.
const BUILD_FORMAT: u32 = 2;

/// A validated description of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsSpec {
    /// Extra packages (sorted, unique), on top of what debootstrap's minbase installs.
    pub packages: BTreeSet<String>,
    /// The Debian mirror, e.g. `http://deb.debian.org/debian`.
    pub mirror: String,
    /// The image size in bytes; `None`: computed from the content ([`super::size`]).
    pub size_bytes: Option<u64>,
}

impl RootfsSpec {
    /// Builds a spec from command-line values: `extra` (`a,b,c` lists, repeatable) is added to
    /// [`DEFAULT_PACKAGES`] unless `no_defaults`; `size_gib` may be fractional.
    pub fn new(
        extra: &[String],
        no_defaults: bool,
        mirror: Option<String>,
        size_gib: Option<f64>,
    ) -> Result<Self, RootfsError> {
        let mut packages = BTreeSet::new();
        if !no_defaults {
            packages.extend(DEFAULT_PACKAGES.iter().map(|&p| p.to_owned()));
        }
        for list in extra {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                check_package_name(name)?;
                packages.insert(name.to_owned());
            }
        }
        let mirror = match mirror {
            Some(m) => check_mirror(m)?,
            None => super::mirror::apt_mirror(SUITE).unwrap_or_else(|| FALLBACK_MIRROR.into()),
        };
        let size_bytes = size_gib.map(size_from_gib).transpose()?;
        Ok(Self {
            packages,
            mirror,
            size_bytes,
        })
    }

    /// The name of this package set's cached image: `rootfs-<16 hex digits>.img`. The hash
    /// covers the release, variant, packages and build format, not the mirror or size (any
    /// mirror of the release serves the same packages).
    pub fn cache_file_name(&self) -> String {
        let mut key = format!("{SUITE}\n{VARIANT}\n{BUILD_FORMAT}\n");
        for p in &self.packages {
            key.push_str(p);
            key.push('\n');
        }
        format!("rootfs-{:016x}.img", fnv1a64(key.as_bytes()))
    }

    /// The packages as debootstrap's `--include=` value; `None` for none.
    pub fn include_arg(&self) -> Option<String> {
        if self.packages.is_empty() {
            return None;
        }
        let list: Vec<&str> = self.packages.iter().map(String::as_str).collect();
        Some(format!("--include={}", list.join(",")))
    }
}

/// The cached image of `spec` in the cache directory `cache_root`.
pub fn cached_image_path(cache_root: &std::path::Path, spec: &RootfsSpec) -> PathBuf {
    cache_root.join(spec.cache_file_name())
}

/// Debian policy: lower-case letters, digits, `+`, `-`, `.`; at least two characters,
/// starting with a letter or digit.
fn check_package_name(name: &str) -> Result<(), RootfsError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if name.len() < 2 || !first_ok || !rest_ok {
        return Err(RootfsError::BadPackage(name.to_owned()));
    }
    Ok(())
}

fn check_mirror(mirror: String) -> Result<String, RootfsError> {
    let mirror = mirror.trim().trim_end_matches('/').to_owned();
    let scheme_ok = ["http://", "https://", "file:///"]
        .iter()
        .any(|s| mirror.starts_with(s) && mirror.len() > s.len());
    if !scheme_ok || mirror.chars().any(char::is_whitespace) {
        return Err(RootfsError::BadMirror(mirror));
    }
    Ok(mirror)
}

/// Smallest and largest `--size` accepted, in GiB.
const MIN_SIZE_GIB: f64 = 0.125;
const MAX_SIZE_GIB: f64 = 1024.0;

fn size_from_gib(gib: f64) -> Result<u64, RootfsError> {
    if !gib.is_finite() || !(MIN_SIZE_GIB..=MAX_SIZE_GIB).contains(&gib) {
        return Err(RootfsError::BadSize(gib));
    }
    // Whole MiB: mkfs works in blocks, and a round size reads well.
    let mib = (gib * 1024.0).ceil() as u64;
    Ok(mib * 1024 * 1024)
}

/// 64-bit FNV-1a: stable across Rust releases (std's hasher is not), enough to tell package
/// sets apart in a file name.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn spec(extra: &[&str], no_defaults: bool) -> Result<RootfsSpec, RootfsError> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        RootfsSpec::new(&extra, no_defaults, Some("http://m/debian".into()), None)
    }

    #[test]
    fn packages_add_to_the_defaults_unless_told_otherwise() {
        let s = spec(&["hpcc,numactl", " numactl , hwloc", ""], false).unwrap();
        let got: Vec<&str> = s.packages.iter().map(String::as_str).collect();
        assert_eq!(got, ["hpcc", "hwloc", "numactl", "openmpi-bin"]);
        assert_eq!(
            s.include_arg().unwrap(),
            "--include=hpcc,hwloc,numactl,openmpi-bin"
        );
        let s = spec(&["numactl"], true).unwrap();
        assert_eq!(s.include_arg().unwrap(), "--include=numactl");
        assert_eq!(spec(&[], true).unwrap().include_arg(), None);
    }

    #[test]
    fn bad_package_names_are_refused_by_name() {
        for bad in ["Openmpi", "a", "-x", "foo bar", "x;rm", "pkg/evil", "é1"] {
            let err = spec(&[bad], false).unwrap_err();
            assert!(matches!(err, RootfsError::BadPackage(_)), "{bad}: {err}");
        }
        let err = spec(&["ok-1,Bad"], false).unwrap_err();
        assert!(err.to_string().contains("\"Bad\""), "{err}");
        for good in ["g++", "libstdc++6", "0ad", "python3.11"] {
            spec(&[good], false).unwrap();
        }
    }

    #[test]
    fn cache_name_depends_on_the_package_set_only() {
        let a = spec(&["numactl,hwloc"], false).unwrap();
        let b = spec(&["hwloc", "numactl", "hwloc"], false).unwrap();
        assert_eq!(a.cache_file_name(), b.cache_file_name());
        let c = spec(&["hwloc"], false).unwrap();
        assert_ne!(a.cache_file_name(), c.cache_file_name());
        let name = a.cache_file_name();
        assert!(
            name.starts_with("rootfs-") && name.ends_with(".img"),
            "{name}"
        );
        assert_eq!(name.len(), "rootfs-".len() + 16 + ".img".len());
        let mut other_mirror = a.clone();
        other_mirror.mirror = "https://elsewhere/debian".into();
        assert_eq!(other_mirror.cache_file_name(), name);
        // Pinned: the name must not change between builds of vhpc for the same content.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn mirrors_and_sizes_are_checked() {
        let m = |s: &str| RootfsSpec::new(&[], false, Some(s.into()), None);
        assert_eq!(m("http://x/debian/").unwrap().mirror, "http://x/debian");
        assert_eq!(
            m("file:///srv/mirror").unwrap().mirror,
            "file:///srv/mirror"
        );
        for bad in ["deb.debian.org/debian", "ftp://x", "http://", "http://a b"] {
            assert!(matches!(m(bad), Err(RootfsError::BadMirror(_))), "{bad}");
        }
        let sized = |g: f64| RootfsSpec::new(&[], false, Some("http://m".into()), Some(g));
        assert_eq!(sized(1.0).unwrap().size_bytes, Some(1 << 30));
        assert_eq!(sized(0.5).unwrap().size_bytes, Some(512 << 20));
        for bad in [0.0, -1.0, 0.1, 2000.0, f64::NAN] {
            let err = sized(bad).unwrap_err();
            assert!(err.to_string().contains("--size"), "{bad}: {err}");
        }
    }
}
