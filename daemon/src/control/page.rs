//! Pagination of list calls (`common.proto`): a page size (0: [`DEFAULT_PAGE_SIZE`], at
//! most [`MAX_PAGE_SIZE`]) and an opaque page token, the hex of the last key returned.
//!
//! Owns: [`paginate`]. Must never: hand out a token that a later call cannot read back.

use super::error::{Error, Result};

/// Entries per page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Most entries per page.
pub const MAX_PAGE_SIZE: u32 = 1000;

fn hex(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// One page of `items` (sorted by `key`, keys unique): those after the token's key, at
/// most `page_size` of them, and the token of the next page (empty: the last page).
///
/// # Errors
/// [`Error::InvalidArgument`] for a page size over the limit or a token this server did
/// not make.
pub fn paginate<T>(
    items: Vec<T>,
    page_size: u32,
    page_token: &str,
    key: impl Fn(&T) -> String,
) -> Result<(Vec<T>, String)> {
    if page_size > MAX_PAGE_SIZE {
        return Err(Error::InvalidArgument {
            field: "page_size",
            reason: format!("{page_size} is more than {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})"),
        });
    }
    let size = usize::try_from(if page_size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        page_size
    })
    .unwrap_or(usize::MAX);
    let after = if page_token.is_empty() {
        None
    } else {
        Some(unhex(page_token).ok_or_else(|| Error::InvalidArgument {
            field: "page_token",
            reason: "not a token from this server's previous page (send it back unchanged, with the same filters)".to_owned(),
        })?)
    };
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|t| after.as_ref().is_none_or(|a| key(t) > *a))
        .take(size.saturating_add(1))
        .collect();
    let next = if page.len() > size {
        page.truncate(size);
        page.last().map(|t| hex(&key(t))).unwrap_or_default()
    } else {
        String::new()
    };
    Ok((page, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_every_item_once() {
        let items: Vec<String> = (0..25).map(|i| format!("v{i:02}")).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = paginate(items.clone(), 10, &token, Clone::clone).expect("page");
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, items);
        let (all, next) = paginate(items.clone(), 0, "", Clone::clone).expect("all");
        assert_eq!((all.len(), next.as_str()), (25, ""));
        assert!(paginate(items.clone(), 0, "zz", Clone::clone).is_err());
        assert!(paginate(items, 5000, "", Clone::clone).is_err());
    }
}
