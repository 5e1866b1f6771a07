//! The error of [`Hub::publish_with_id`](super::Hub::publish_with_id).

use std::fmt;

/// A frame [`Hub::publish_with_id`](super::Hub::publish_with_id) refused:
/// its id was not after the newest one (ids strictly increase), or it was
/// `u64::MAX` (reserved). Nothing already published is lost; the item comes
/// back with [`into_inner`](Self::into_inner).
///
/// ```
/// use bytes::Bytes;
/// use tower_backpressure::Hub;
///
/// let hub: Hub = Hub::default();
/// hub.publish_with_id(7, Bytes::from("a")).unwrap();
/// let err = hub.publish_with_id(7, Bytes::from("b")).unwrap_err();
/// assert_eq!(err.to_string(), "hub frame id 7 is not after the newest id 7");
/// assert_eq!((err.id(), err.newest_id()), (7, Some(7)));
/// assert_eq!(err.into_inner(), "b");
/// assert_eq!(hub.retained(), 1);
/// ```
pub struct PublishError<T> {
    id: u64,
    newest: Option<u64>,
    item: T,
}

impl<T> PublishError<T> {
    pub(crate) fn new(id: u64, newest: Option<u64>, item: T) -> Self {
        Self { id, newest, item }
    }

    /// The id that was refused.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The hub's newest id when the frame was refused.
    pub fn newest_id(&self) -> Option<u64> {
        self.newest
    }

    /// The item that was not published.
    pub fn item(&self) -> &T {
        &self.item
    }

    /// Takes the item back.
    pub fn into_inner(self) -> T {
        self.item
    }
}

impl<T> fmt::Debug for PublishError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishError")
            .field("id", &self.id)
            .field("newest", &self.newest)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for PublishError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.newest {
            Some(newest) if self.id <= newest => write!(
                f,
                "hub frame id {} is not after the newest id {newest}",
                self.id
            ),
            _ => write!(
                f,
                "hub frame id {} is out of range (u64::MAX is reserved)",
                self.id
            ),
        }
    }
}

impl<T> std::error::Error for PublishError<T> {}
