//! Path normalization: one function, used by routing and by authorization
//! alike, and the normalized path is what the application receives.
//!
//! Istio's path CVEs (CVE-2019-9901, CVE-2020-8595, CVE-2021-31920) came
//! from a policy check and a router (or the app) reading the same path
//! differently. Here the path is decoded and cleaned once:
//! percent-escapes are decoded (`%2F` and `%5C` included, like Istio's
//! `DECODE_AND_MERGE_SLASHES`), backslashes become slashes, duplicate
//! slashes merge, and `.` / `..` segments are removed (RFC 3986 5.2.4).
//! What cannot be decoded (a bad escape, NUL or control bytes, invalid
//! UTF-8) is refused with 400, never guessed.

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("bad percent-escape at byte {0}")]
    BadEscape(usize),
    #[error("the path contains a NUL or control character")]
    Control,
    #[error("the decoded path is not UTF-8")]
    NotUtf8,
    #[error("the path must start with '/'")]
    NotAbsolute,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes the path part of a request target (no query).
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let raw = path.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (h, l) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            );
            let (Some(h), Some(l)) = (h, l) else {
                return Err(PathError::BadEscape(i));
            };
            decoded.push(h << 4 | l);
            i += 3;
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(PathError::Control);
    }
    let text = String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)?;
    let text = text.replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = text.split('/').collect();
    let last = segments.len() - 1;
    let mut trailing = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" => trailing = n == last && n > 0,
            "." => trailing = n == last,
            ".." => {
                out.pop();
                trailing = n == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut result = String::with_capacity(text.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing || out.is_empty() {
        result.push('/');
    }
    Ok(result)
}

/// Re-encodes a normalized path for the request line: every byte outside
/// RFC 3986 `pchar` and `/` is percent-encoded, so the application sees
/// exactly the path that was checked.
pub fn encode(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'/' | b'-'
                    | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
            );
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_and_dot_segments_reach_one_form() {
        for p in [
            "/admin",
            "/%61dmin",
            "/public/../admin",
            "/./admin",
            "//admin",
            "/public/%2e%2e/admin",
            "/public%2F..%2Fadmin",
            "/public\\..\\admin",
            "/x/y/../../admin",
            "/../admin",
        ] {
            assert_eq!(normalize(p).unwrap(), "/admin", "{p}");
        }
        assert_eq!(normalize("/a/b/").unwrap(), "/a/b/");
        assert_eq!(normalize("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("/a/..").unwrap(), "/");
        assert_eq!(normalize("/caf%C3%A9").unwrap(), "/café");
    }

    #[test]
    fn undecodable_paths_are_refused() {
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%00b"), Err(PathError::Control));
        assert_eq!(normalize("/a%0d%0ab"), Err(PathError::Control));
        assert_eq!(normalize("/%ff"), Err(PathError::NotUtf8));
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn encoding_round_trips() {
        for p in ["/café/a b", "/a%3Fb", "/x?y"] {
            let n = normalize(p).unwrap();
            assert_eq!(normalize(&encode(&n)).unwrap(), n, "{p}");
        }
        assert_eq!(encode("/a?b#c d"), "/a%3Fb%23c%20d");
    }
}
