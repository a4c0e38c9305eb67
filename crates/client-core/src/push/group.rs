//! The only MLS-facing part of push keys: exporting the PCEK of a group's
//! current epoch. Nothing on the decrypt path uses this file.

use kalandra_proto::RoomId;
use openmls::storage::OpenMlsProvider;

use super::{wipe, NotificationKey, Secret, PCEK_BYTES, PUSH_EXPORTER_LABEL};
use crate::mls::{ExportError, RoomGroup};

impl NotificationKey {
    /// The push key of `group`'s current epoch:
    /// `MLS-Exporter("kalandra push v1", room_id, 32)`, then
    /// [`NotificationKey::from_pcek`].
    pub fn from_group<P: OpenMlsProvider>(provider: &P, group: &RoomGroup) -> Result<Self, ExportError> {
        let room_id = group.room_id();
        let mut exported = group.export_secret(provider, PUSH_EXPORTER_LABEL, &room_id, PCEK_BYTES)?;
        let pcek: Result<[u8; PCEK_BYTES], _> = exported.as_slice().try_into();
        wipe(&mut exported);
        let Ok(pcek) = pcek else {
            return Err(ExportError::Export("exporter returned a secret of the wrong length".into()));
        };
        let pcek = Secret(pcek);
        Ok(Self::from_pcek(RoomId(room_id), group.epoch(), &pcek.0))
    }
}
