//! The gRPC handlers of `ImageService`: images are records in the store with their files under
//! `<state dir>/images/<id>/` (see [`crate::images`] for the layout and how they are written).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status, Streaming};

use crate::error::AgentError;
use crate::images::{
    check_image_id, check_part_size, check_sha256, copy_sparse, image_record, open_source, part_name,
    remove_image_dir, PartWriter, Staging,
};
use crate::proto::image_service_server::ImageService;
use crate::proto::{
    upload_image_request, DeleteImageRequest, DeleteImageResponse, GetImageRequest, Image, ImagePart,
    ListImagesRequest, ListImagesResponse, RegisterImageRequest, UploadImageHeader, UploadImageRequest,
};
use crate::requests::{fingerprint, Requests};
use crate::spec::{check_labels, check_request_id, Selector};
use crate::state::Context;
use crate::store::now_ms;

/// Default and largest page of `ListImages`.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// Page tokens carry the last id of the previous page behind this prefix.
const PAGE_TOKEN_PREFIX: &str = "after:";

/// `ImageService` on top of the store and the state directory.
pub struct ImageApi {
    ctx: Arc<Context>,
    ready: Arc<AtomicBool>,
    requests: Requests,
    /// Ids being registered or uploaded now: a second call for one of them is refused rather
    /// than left to copy gigabytes for nothing.
    in_flight: Arc<Mutex<HashSet<String>>>,
    /// Serializes the request-id check and the work of deletes.
    delete_lock: tokio::sync::Mutex<()>,
}

/// An id held in `in_flight` until dropped.
struct Reservation {
    in_flight: Arc<Mutex<HashSet<String>>>,
    image_id: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut set = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.image_id);
    }
}

/// A part of a registration: where it comes from and how long it is.
type Source = (ImagePart, File, u64);

/// What a copy or placement failure becomes: details in the log, a fixed text on the wire.
fn internal(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(format!("{what}: {e}"))
}

impl ImageApi {
    /// Handlers answer UNAVAILABLE until `ready` is set (after re-adoption).
    pub fn new(ctx: Arc<Context>, ready: Arc<AtomicBool>) -> Self {
        ImageApi {
            requests: Requests::new(ctx.store.clone()),
            ctx,
            ready,
            in_flight: Arc::default(),
            delete_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn check_ready(&self) -> Result<(), AgentError> {
        crate::requests::check_ready(&self.ready)
    }

    /// Holds `image_id` for one registration: ALREADY_EXISTS if it is an image or being made.
    async fn reserve(&self, image_id: &str) -> Result<Reservation, AgentError> {
        let id = image_id.to_string();
        if self.ctx.store.call(move |s| s.get_image(&id)).await?.is_some() {
            return Err(AgentError::ImageExists(format!(
                "an image with id '{image_id}' already exists"
            )));
        }
        self.hold(image_id)
    }

    /// Holds `image_id` while its files are written or removed, so that a registration and a
    /// deletion of one id never work on its directory at once.
    fn hold(&self, image_id: &str) -> Result<Reservation, AgentError> {
        let mut set = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(image_id.to_string()) {
            return Err(AgentError::ImageExists(format!(
                "an image with id '{image_id}' is being registered or deleted by another call"
            )));
        }
        Ok(Reservation {
            in_flight: self.in_flight.clone(),
            image_id: image_id.to_string(),
        })
    }

    /// Moves a complete staging directory into place and records the image; on failure nothing
    /// of it is left.
    async fn commit(
        &self,
        staging: Staging,
        image_id: &str,
        parts: Vec<(ImagePart, u64, String)>,
        labels: HashMap<String, String>,
    ) -> Result<Image, AgentError> {
        let dir = tokio::task::spawn_blocking(move || staging.place())
            .await
            .map_err(|e| internal("placing an image", e))?
            .map_err(|e| internal("placing an image", e))?;
        let image = image_record(image_id, &dir, &parts, labels, now_ms());
        let stored = image.clone();
        if let Err(e) = self.ctx.store.call(move |s| s.insert_image(&stored)).await {
            remove_image_dir(&self.ctx.config.images_dir(), image_id);
            return Err(e);
        }
        Ok(image)
    }

    /// Opens and checks the files a RegisterImage names.
    fn sources(&self, req: &RegisterImageRequest) -> Result<Vec<Source>, AgentError> {
        let max = self.ctx.config.image_max_bytes;
        let mut sources = Vec::new();
        let mut total = 0;
        for (part, path) in [
            (ImagePart::Kernel, &req.kernel),
            (ImagePart::Rootfs, &req.rootfs),
            (ImagePart::Initrd, &req.initrd),
        ] {
            if part == ImagePart::Initrd && path.is_empty() {
                continue;
            }
            let field = part_name(part);
            let (file, len) = open_source(field, path)?;
            check_part_size(field, part, len, total, max)?;
            total += len;
            sources.push((part, file, len));
        }
        Ok(sources)
    }
}

/// Checks an upload's header and returns the parts it announces with their sizes.
fn check_header(h: &UploadImageHeader, max: u64) -> Result<Vec<(ImagePart, u64)>, AgentError> {
    check_image_id("header.image_id", &h.image_id)?;
    check_labels("header.labels", &h.labels)?;
    check_request_id(&h.request_id)?;
    let mut parts = Vec::new();
    let mut total = 0;
    for (part, size, digest) in [
        (ImagePart::Kernel, h.kernel_size, &h.kernel_sha256),
        (ImagePart::Rootfs, h.rootfs_size, &h.rootfs_sha256),
        (ImagePart::Initrd, h.initrd_size, &h.initrd_sha256),
    ] {
        let name = part_name(part);
        check_sha256(&format!("header.{name}_sha256"), digest)?;
        if part == ImagePart::Initrd && size == 0 {
            if !digest.is_empty() {
                return Err(AgentError::invalid(
                    "header.initrd_sha256",
                    "given without an initrd",
                ));
            }
            continue;
        }
        check_part_size(&format!("header.{name}_size"), part, size, total, max)?;
        total += size;
        parts.push((part, size));
    }
    Ok(parts)
}

/// The digest announced for `part`, if any.
fn announced_sha256(h: &UploadImageHeader, part: ImagePart) -> &str {
    match part {
        ImagePart::Kernel => &h.kernel_sha256,
        ImagePart::Rootfs => &h.rootfs_sha256,
        ImagePart::Initrd => &h.initrd_sha256,
        ImagePart::Unspecified => "",
    }
}

/// Receives the chunks after the header into `writers` (one per announced part).
async fn receive_chunks(
    stream: &mut Streaming<UploadImageRequest>,
    writers: &mut HashMap<i32, PartWriter>,
) -> Result<(), Status> {
    while let Some(message) = stream.message().await? {
        let chunk = match message.item {
            Some(upload_image_request::Item::Chunk(c)) => c,
            Some(upload_image_request::Item::Header(_)) => {
                return Err(AgentError::invalid("header", "only the first message may be a header").into())
            }
            None => return Err(AgentError::invalid("item", "each message is a header or a chunk").into()),
        };
        let part = match ImagePart::try_from(chunk.part) {
            Ok(p) if p != ImagePart::Unspecified => p,
            _ => return Err(AgentError::invalid("chunk.part", "must be KERNEL, ROOTFS or INITRD").into()),
        };
        let Some(mut writer) = writers.remove(&chunk.part) else {
            return Err(AgentError::invalid(
                "chunk.part",
                format!("the header announced no {}", part_name(part)),
            )
            .into());
        };
        if chunk.data.len() as u64 > writer.remaining() {
            return Err(AgentError::invalid(
                "chunk.data",
                format!("more {} bytes than the header announced", part_name(part)),
            )
            .into());
        }
        let writer = tokio::task::spawn_blocking(move || writer.append(&chunk.data).map(|()| writer))
            .await
            .map_err(|e| internal("writing an upload", e))?
            .map_err(|e| internal("writing an upload", e))?;
        writers.insert(part as i32, writer);
    }
    Ok(())
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    async fn register_image(
        &self,
        request: Request<RegisterImageRequest>,
    ) -> Result<Response<Image>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_request_id(&req.request_id)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        // Before validation: a retry gets its first answer even if the source files are gone.
        if let Some(image) = self
            .requests
            .replay::<Image>(&req.request_id, "RegisterImage", &fp)
            .await?
        {
            return Ok(Response::new(image));
        }
        check_image_id("image_id", &req.image_id)?;
        check_labels("labels", &req.labels)?;
        let sources = self.sources(&req)?;
        let _held = self.reserve(&req.image_id).await?;
        let staging = Staging::create(&self.ctx.config.images_dir(), &req.image_id)
            .map_err(|e| internal("staging an image", e))?;
        let (staging, parts) = tokio::task::spawn_blocking(move || {
            let mut parts = Vec::new();
            for (part, src, len) in sources {
                let dst = File::create(staging.path(part))?;
                let digest = copy_sparse(&src, &dst, len)?;
                parts.push((part, len, digest));
            }
            Ok::<_, std::io::Error>((staging, parts))
        })
        .await
        .map_err(|e| internal("copying an image", e))?
        .map_err(|e| internal("copying an image", e))?;
        let image = self
            .commit(staging, &req.image_id, parts, req.labels.clone())
            .await?;
        tracing::info!(image = %req.image_id, "image registered");
        let image = self
            .requests
            .remember(&req.request_id, "RegisterImage", fp, image)
            .await?;
        Ok(Response::new(image))
    }

    async fn upload_image(
        &self,
        request: Request<Streaming<UploadImageRequest>>,
    ) -> Result<Response<Image>, Status> {
        let mut stream = request.into_inner();
        self.check_ready()?;
        let header = match stream.message().await? {
            Some(UploadImageRequest {
                item: Some(upload_image_request::Item::Header(h)),
            }) => h,
            _ => return Err(AgentError::invalid("header", "the first message must be the header").into()),
        };
        let announced = check_header(&header, self.ctx.config.image_max_bytes)?;
        let fp = fingerprint(&header, |h| h.request_id.clear());
        if let Some(image) = self
            .requests
            .replay::<Image>(&header.request_id, "UploadImage", &fp)
            .await?
        {
            return Ok(Response::new(image));
        }
        let _held = self.reserve(&header.image_id).await?;
        let staging = Staging::create(&self.ctx.config.images_dir(), &header.image_id)
            .map_err(|e| internal("staging an image", e))?;
        let mut writers = HashMap::new();
        for (part, size) in &announced {
            let writer = PartWriter::create(&staging.path(*part), *size)
                .map_err(|e| internal("staging an image", e))?;
            writers.insert(*part as i32, writer);
        }
        receive_chunks(&mut stream, &mut writers).await?;
        let mut parts = Vec::new();
        for (part, size) in announced {
            let name = part_name(part);
            let Some(writer) = writers.remove(&(part as i32)) else {
                continue;
            };
            if !writer.complete() {
                return Err(AgentError::invalid(
                    format!("header.{name}_size"),
                    format!(
                        "announced {size} bytes, but the stream ended after {}",
                        size - writer.remaining()
                    ),
                )
                .into());
            }
            let digest = writer.finish();
            let wanted = announced_sha256(&header, part);
            if !wanted.is_empty() && !wanted.eq_ignore_ascii_case(&digest) {
                return Err(AgentError::invalid(
                    format!("header.{name}_sha256"),
                    format!("the {name} that arrived has SHA-256 {digest}"),
                )
                .into());
            }
            parts.push((part, size, digest));
        }
        let image = self
            .commit(staging, &header.image_id, parts, header.labels.clone())
            .await?;
        tracing::info!(image = %header.image_id, "image uploaded");
        let image = self
            .requests
            .remember(&header.request_id, "UploadImage", fp, image)
            .await?;
        Ok(Response::new(image))
    }

    async fn get_image(&self, request: Request<GetImageRequest>) -> Result<Response<Image>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_image_id("image_id", &req.image_id)?;
        let id = req.image_id.clone();
        let image = self.ctx.store.call(move |s| s.get_image(&id)).await?;
        Ok(Response::new(
            image.ok_or_else(|| AgentError::ImageNotFound(req.image_id))?,
        ))
    }

    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        let selector = Selector::parse(&req.label_selector)?;
        let after = match req.page_token.as_str() {
            "" => None,
            t => match t.strip_prefix(PAGE_TOKEN_PREFIX) {
                Some(id) if check_image_id("page_token", id).is_ok() => Some(id.to_string()),
                _ => return Err(AgentError::invalid("page_token", "not a token from ListImages").into()),
            },
        };
        let page_size = match req.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let all = self.ctx.store.call(|s| s.list_images()).await?;
        let mut matching = all.into_iter().filter(|i| {
            after.as_ref().is_none_or(|a| i.image_id.as_str() > a.as_str()) && selector.matches(&i.labels)
        });
        let images: Vec<Image> = matching.by_ref().take(page_size).collect();
        let next_page_token = match (matching.next(), images.last()) {
            (Some(_), Some(last)) => format!("{PAGE_TOKEN_PREFIX}{}", last.image_id),
            _ => String::new(),
        };
        Ok(Response::new(ListImagesResponse {
            images,
            next_page_token,
        }))
    }

    async fn delete_image(
        &self,
        request: Request<DeleteImageRequest>,
    ) -> Result<Response<DeleteImageResponse>, Status> {
        let req = request.into_inner();
        self.check_ready()?;
        check_image_id("image_id", &req.image_id)?;
        let fp = fingerprint(&req, |r| r.request_id.clear());
        let _guard = self.delete_lock.lock().await;
        if let Some(done) = self
            .requests
            .replay::<DeleteImageResponse>(&req.request_id, "DeleteImage", &fp)
            .await?
        {
            return Ok(Response::new(done));
        }
        let _held = self.hold(&req.image_id)?;
        let id = req.image_id.clone();
        // The use check and the removal of the record are one step under the store's lock: a
        // CreateVm naming the image checks it exists in the same way.
        self.ctx.store.call(move |s| s.delete_image(&id)).await?;
        let images_dir = self.ctx.config.images_dir();
        let id = req.image_id.clone();
        let _ = tokio::task::spawn_blocking(move || remove_image_dir(&images_dir, &id)).await;
        tracing::info!(image = %req.image_id, "image deleted");
        let done = self
            .requests
            .remember(&req.request_id, "DeleteImage", fp, DeleteImageResponse {})
            .await?;
        Ok(Response::new(done))
    }
}
