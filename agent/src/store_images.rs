//! The `images` table: the base images this agent keeps, and who uses them. Use is not stored
//! but read from the VMs' and snapshots' specs under the store's lock, so that a delete and a
//! create naming the same image cannot pass each other.

use std::collections::HashMap;

use prost::Message;
use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};
use crate::images::spec_image_ids;
use crate::proto::{Image, Snapshot, VmSpec};

/// Who uses an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageUsers {
    /// VMs whose spec names it, by id.
    pub vms: Vec<String>,
    /// Snapshots whose spec names it, by id.
    pub snapshots: Vec<String>,
}

impl Store {
    /// Stores a new image record; [`StoreError::ImageExists`] if the id is taken.
    pub fn insert_image(&mut self, image: &Image) -> Result<(), StoreError> {
        let mut stored = image.clone();
        stored.vms_using = 0;
        stored.snapshots_using = 0;
        let inserted = self.conn.execute(
            "INSERT INTO images (image_id, image) VALUES (?1, ?2) ON CONFLICT (image_id) DO NOTHING",
            params![image.image_id, stored.encode_to_vec()],
        )?;
        if inserted == 0 {
            return Err(StoreError::ImageExists(image.image_id.clone()));
        }
        Ok(())
    }

    /// One image, with its users counted.
    pub fn get_image(&self, image_id: &str) -> Result<Option<Image>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT image FROM images WHERE image_id = ?1", [image_id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(blob) = blob else {
            return Ok(None);
        };
        let mut image = Image::decode(blob.as_slice())?;
        let users = self.image_users()?;
        count_users(&mut image, &users);
        Ok(Some(image))
    }

    /// The ids of every image.
    pub fn image_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT image_id FROM images ORDER BY image_id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every image, ordered by id, with its users counted.
    pub fn list_images(&self) -> Result<Vec<Image>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT image FROM images ORDER BY image_id")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let users = self.image_users()?;
        let mut images = Vec::new();
        for blob in rows {
            let mut image = Image::decode(blob?.as_slice())?;
            count_users(&mut image, &users);
            images.push(image);
        }
        Ok(images)
    }

    /// Each of `ids` must be an image ([`StoreError::ImageNotFound`] for the first that is not).
    pub fn check_images_exist(&self, ids: &[String]) -> Result<(), StoreError> {
        for id in ids {
            let found = self
                .conn
                .query_row("SELECT 1 FROM images WHERE image_id = ?1", [id], |_| Ok(()))
                .optional()?;
            if found.is_none() {
                return Err(StoreError::ImageNotFound(id.clone()));
            }
        }
        Ok(())
    }

    /// Who uses each image, by image id.
    pub fn image_users(&self) -> Result<HashMap<String, ImageUsers>, StoreError> {
        let mut users: HashMap<String, ImageUsers> = HashMap::new();
        let mut stmt = self.conn.prepare("SELECT vm_id, spec FROM vms ORDER BY vm_id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        for row in rows {
            let (vm_id, spec) = row?;
            for id in spec_image_ids(&VmSpec::decode(spec.as_slice())?) {
                users.entry(id).or_default().vms.push(vm_id.clone());
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT snapshot_id, snapshot FROM snapshots ORDER BY snapshot_id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        for row in rows {
            let (snapshot_id, blob) = row?;
            let spec = Snapshot::decode(blob.as_slice())?.spec.unwrap_or_default();
            for id in spec_image_ids(&spec) {
                users.entry(id).or_default().snapshots.push(snapshot_id.clone());
            }
        }
        Ok(users)
    }

    /// Forgets an image unless a VM or snapshot uses it ([`StoreError::ImageInUse`], naming
    /// them); returns the record it had.
    pub fn delete_image(&mut self, image_id: &str) -> Result<Image, StoreError> {
        let Some(image) = self.get_image(image_id)? else {
            return Err(StoreError::ImageNotFound(image_id.to_string()));
        };
        let users = self.image_users()?.remove(image_id).unwrap_or_default();
        if !users.vms.is_empty() || !users.snapshots.is_empty() {
            return Err(StoreError::ImageInUse(in_use_message(image_id, &users)));
        }
        self.conn
            .execute("DELETE FROM images WHERE image_id = ?1", [image_id])?;
        Ok(image)
    }
}

fn count_users(image: &mut Image, users: &HashMap<String, ImageUsers>) {
    let u = users.get(&image.image_id);
    image.vms_using = u.map_or(0, |u| u.vms.len() as u32);
    image.snapshots_using = u.map_or(0, |u| u.snapshots.len() as u32);
}

/// "image 'x' is used by VM 'a' (and 2 more) and snapshot 's'; delete them first".
fn in_use_message(image_id: &str, users: &ImageUsers) -> String {
    let name = |kind: &str, ids: &[String]| match ids {
        [] => None,
        [one] => Some(format!("{kind} '{one}'")),
        [first, rest @ ..] => Some(format!("{kind} '{first}' (and {} more)", rest.len())),
    };
    let parts: Vec<String> = [name("VM", &users.vms), name("snapshot", &users.snapshots)]
        .into_iter()
        .flatten()
        .collect();
    format!(
        "image '{image_id}' is used by {}; delete them first",
        parts.join(" and ")
    )
}
