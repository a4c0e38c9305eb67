//! Push-notification keys (PCEK): everything of [`kalandra_nse`] (the
//! formats, `seal_push`, `decrypt_push`, the key cache and its file), plus
//! the only MLS-facing part, [`NotificationKeyFromGroup::from_group`], which
//! exports the PCEK of a group's current epoch. The format is documented in
//! [`kalandra_nse`].

pub use kalandra_nse::*;

use kalandra_proto::RoomId;
use openmls::storage::OpenMlsProvider;

use crate::mls::{ExportError, RoomGroup};

/// Derives a [`NotificationKey`] from an MLS group.
pub trait NotificationKeyFromGroup: Sized {
    /// The push key of `group`'s current epoch:
    /// `MLS-Exporter("kalandra push v1", room_id, 32)`, then
    /// [`NotificationKey::from_pcek`].
    fn from_group<P: OpenMlsProvider>(provider: &P, group: &RoomGroup) -> Result<Self, ExportError>;
}

impl NotificationKeyFromGroup for NotificationKey {
    fn from_group<P: OpenMlsProvider>(provider: &P, group: &RoomGroup) -> Result<Self, ExportError> {
        let room_id = group.room_id();
        let mut exported = group.export_secret(provider, PUSH_EXPORTER_LABEL, &room_id, PCEK_BYTES)?;
        let pcek: Result<[u8; PCEK_BYTES], _> = exported.as_slice().try_into();
        wipe(&mut exported);
        let Ok(mut pcek) = pcek else {
            return Err(ExportError::Export("exporter returned a secret of the wrong length".into()));
        };
        let key = NotificationKey::from_pcek(RoomId(room_id), group.epoch(), &pcek);
        wipe(&mut pcek);
        Ok(key)
    }
}

/// Overwrites `bytes` with zeros in a way the optimiser keeps.
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}
