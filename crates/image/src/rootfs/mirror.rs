//! The Debian mirror this host's apt already uses: an HPC site usually has its own, and the
//! machine may reach no other.

use std::path::Path;

/// The first mirror that `/etc/apt/sources.list` and `/etc/apt/sources.list.d/*` name for
/// `suite` (binary packages), if any.
pub fn apt_mirror(suite: &str) -> Option<String> {
    let mut files = vec![Path::new("/etc/apt/sources.list").to_path_buf()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut names: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        names.sort();
        files.extend(names);
    }
    files.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("sources") => mirror_in_deb822(&text, suite),
            _ => mirror_in_one_line(&text, suite),
        }
    })
}

/// `deb [options] URI SUITE COMPONENT...` lines.
fn mirror_in_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options run up to the word that ends with ']'.
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        (words.next() == Some(suite)).then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// deb822 stanzas: `Types: deb`, `URIs: ...`, `Suites: ...`, separated by blank lines.
fn mirror_in_deb822(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (key, value) = l.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
            })
        };
        let types = field("Types")?;
        let suites = field("Suites")?;
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        if !enabled
            || !types.split_whitespace().any(|t| t == "deb")
            || !suites.split_whitespace().any(|s| s == suite)
        {
            return None;
        }
        let uri = field("URIs")?.split_whitespace().next()?;
        Some(uri.trim_end_matches('/').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_format() {
        let text = "# deb http://old/debian bookworm main\n\
                    deb-src http://src/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://site/debian/ bookworm main\n\
                    deb http://other/debian bookworm-updates main\n";
        assert_eq!(
            mirror_in_one_line(text, "bookworm").as_deref(),
            Some("http://site/debian")
        );
        assert_eq!(mirror_in_one_line(text, "trixie"), None);
        assert_eq!(mirror_in_one_line("deb [broken", "bookworm"), None);
    }

    #[test]
    fn deb822_format() {
        let text = "Types: deb\nURIs: http://deb.debian.org/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n\n\
                    Types: deb-src deb\n# a comment\nURIs: http://deb.debian.org/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            mirror_in_deb822(text, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let disabled = "Types: deb\nURIs: http://x\nSuites: bookworm\nEnabled: no\n";
        assert_eq!(mirror_in_deb822(disabled, "bookworm"), None);
    }
}
