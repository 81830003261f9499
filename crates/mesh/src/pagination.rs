//! List pagination as the contracts define it: `page_size` (default and maximum here) and opaque
//! page tokens. A token wraps the sort key of the last item returned; clients must not parse it.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::status::FieldViolations;

/// Items per page when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Largest page served; larger requests are capped, as AIP-158 recommends.
pub const MAX_PAGE_SIZE: i64 = 500;

/// Version tag inside tokens, so their format can change without misreading old ones.
const TOKEN_PREFIX: &str = "v1:";

/// A validated page request: how many items, and after which sort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub size: i64,
    pub after: Option<String>,
}

impl Page {
    /// Parses `page_size` and `page_token`, recording violations under those field names.
    pub fn parse(page_size: i32, page_token: &str, violations: &mut FieldViolations) -> Self {
        let size = match i64::from(page_size) {
            n if n < 0 => {
                violations.add("page_size", "must not be negative");
                DEFAULT_PAGE_SIZE
            }
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            let decoded = URL_SAFE_NO_PAD
                .decode(page_token)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| text.strip_prefix(TOKEN_PREFIX).map(str::to_owned));
            if decoded.is_none() {
                violations.add("page_token", "is not a token this service issued");
            }
            decoded
        };
        Self { size, after }
    }

    /// How many rows to fetch: one more than the page, to know whether another page follows.
    pub fn fetch_limit(&self) -> i64 {
        self.size + 1
    }

    /// Trims `rows` (fetched with [`Page::fetch_limit`]) to the page and returns the next token.
    pub fn finish<T>(&self, rows: &mut Vec<T>, sort_key: impl Fn(&T) -> String) -> String {
        let size = usize::try_from(self.size).unwrap_or(usize::MAX);
        if rows.len() > size {
            rows.truncate(size);
            rows.last()
                .map(|last| encode(&sort_key(last)))
                .unwrap_or_default()
        } else {
            String::new()
        }
    }
}

fn encode(sort_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{sort_key}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_default_and_large_sizes_are_capped() {
        let mut v = FieldViolations::new();
        assert_eq!(Page::parse(0, "", &mut v).size, DEFAULT_PAGE_SIZE);
        assert_eq!(Page::parse(10_000, "", &mut v).size, MAX_PAGE_SIZE);
        assert!(v.is_empty());
    }

    #[test]
    fn negative_size_and_foreign_token_are_violations() {
        let mut v = FieldViolations::new();
        Page::parse(-1, "garbage!", &mut v);
        assert_eq!(v.fields(), vec!["page_size", "page_token"]);
    }

    #[test]
    fn a_token_resumes_after_the_last_item() {
        let page = Page {
            size: 2,
            after: None,
        };
        let mut rows = vec!["a", "b", "c"];
        let token = page.finish(&mut rows, |r| (*r).to_owned());
        assert_eq!(rows, vec!["a", "b"]);
        let mut v = FieldViolations::new();
        assert_eq!(Page::parse(2, &token, &mut v).after.as_deref(), Some("b"));
    }

    #[test]
    fn the_last_page_has_no_token() {
        let page = Page {
            size: 5,
            after: None,
        };
        let mut rows = vec![1, 2];
        assert_eq!(page.finish(&mut rows, |r| r.to_string()), "");
    }
}
