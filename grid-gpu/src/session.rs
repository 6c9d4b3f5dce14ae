//! One task's view of the GPU: handles, accounting, limits.

use crate::block_on;
use crate::device::GpuDevice;
use grid_proto::{Limit, one_line};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wgpu::naga;

/// Per-task GPU limits. `Default` gives a node's defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuLimits {
    /// Bytes of all live buffers together. Default 256 MiB. Past it: `limit: gpu-memory`.
    pub max_buffer_bytes: u64,
    /// Live buffers and kernels together. Default 256. Past it: `limit: gpu-objects`.
    pub max_objects: u32,
    /// Workgroups of one dispatch (x·y·z). Default 2^22. Past it: `limit: gpu-dispatch`.
    pub max_workgroups_per_dispatch: u64,
    /// Dispatches per task. Default 1,000,000. Past it: `limit: gpu-dispatch`.
    pub max_dispatches: u64,
    /// Bytes of one kernel's WGSL source. Default 256 KiB.
    pub max_shader_bytes: usize,
    /// Time the task's GPU work may take in all. Default 60 s. A session on its own counts the
    /// waits for its submissions; the node's GPU worker counts the whole of every call.
    pub gpu_time: Duration,
}

impl Default for GpuLimits {
    fn default() -> Self {
        Self {
            max_buffer_bytes: 256 << 20,
            max_objects: 256,
            max_workgroups_per_dispatch: 1 << 22,
            max_dispatches: 1_000_000,
            max_shader_bytes: 256 << 10,
            gpu_time: Duration::from_secs(60),
        }
    }
}

impl GpuLimits {
    /// Each limit lowered to `caps` where it asks for more (a node's ceilings).
    pub fn capped_by(&self, caps: &GpuLimits) -> GpuLimits {
        GpuLimits {
            max_buffer_bytes: self.max_buffer_bytes.min(caps.max_buffer_bytes),
            max_objects: self.max_objects.min(caps.max_objects),
            max_workgroups_per_dispatch: self
                .max_workgroups_per_dispatch
                .min(caps.max_workgroups_per_dispatch),
            max_dispatches: self.max_dispatches.min(caps.max_dispatches),
            max_shader_bytes: self.max_shader_bytes.min(caps.max_shader_bytes),
            gpu_time: self.gpu_time.min(caps.gpu_time),
        }
    }
}

/// A task's name for one of its buffers or kernels. 0 is never a valid handle.
pub type Handle = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuErrorKind {
    /// No such handle in this task (never created, destroyed, another task's, wrong kind).
    BadHandle,
    /// A size, offset or count that cannot work (misaligned, out of range, wrong binding count).
    BadArgument,
    /// WGSL that does not parse or validate, or has no such compute entry point.
    Shader,
    /// A hard limit; the task should end with `limit: …`.
    Limit(Limit),
    /// The device failed.
    Device,
}

/// A failed GPU call: what kind, and one line a guest can show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct GpuError {
    pub kind: GpuErrorKind,
    pub message: String,
}

fn err(kind: GpuErrorKind, message: impl Into<String>) -> GpuError {
    GpuError {
        kind,
        message: message.into(),
    }
}

fn limit(which: Limit, message: impl Into<String>) -> GpuError {
    err(GpuErrorKind::Limit(which), message)
}

enum Object {
    Buffer {
        buffer: wgpu::Buffer,
        size: u64,
    },
    Kernel {
        pipeline: wgpu::ComputePipeline,
        /// The layout of `@group(0)`: every storage binding the module declares, used or not.
        layout: wgpu::BindGroupLayout,
        bindings: u32,
    },
}

/// One task's GPU objects. Dropping it frees them all.
pub struct GpuSession {
    gpu: Arc<GpuDevice>,
    limits: GpuLimits,
    objects: HashMap<Handle, Object>,
    next: Handle,
    live_bytes: u64,
    dispatches: u64,
    gpu_time_used: Duration,
}

impl GpuSession {
    pub fn new(gpu: Arc<GpuDevice>, limits: GpuLimits) -> Self {
        Self {
            gpu,
            limits,
            objects: HashMap::new(),
            next: 1,
            live_bytes: 0,
            dispatches: 0,
            gpu_time_used: Duration::ZERO,
        }
    }

    /// GPU time this task has used so far.
    pub fn gpu_time_used(&self) -> Duration {
        self.gpu_time_used
    }

    fn insert(&mut self, object: Object) -> Handle {
        let h = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        self.objects.insert(h, object);
        h
    }

    fn check_room_for_object(&self) -> Result<(), GpuError> {
        if self.objects.len() as u64 >= u64::from(self.limits.max_objects) {
            return Err(limit(
                Limit::GpuObjects,
                format!("more than {} GPU objects", self.limits.max_objects),
            ));
        }
        Ok(())
    }

    fn buffer(&self, h: Handle) -> Result<(&wgpu::Buffer, u64), GpuError> {
        match self.objects.get(&h) {
            Some(Object::Buffer { buffer, size }) => Ok((buffer, *size)),
            _ => Err(err(
                GpuErrorKind::BadHandle,
                format!("{h} is not a buffer of this task"),
            )),
        }
    }

    /// Runs `f` inside error scopes: a wgpu validation error becomes `kind`, running out of GPU
    /// memory becomes `limit: gpu-memory`, an internal error `Device`.
    fn scoped<T>(
        &self,
        kind: GpuErrorKind,
        f: impl FnOnce(&wgpu::Device) -> T,
    ) -> Result<T, GpuError> {
        let device = &self.gpu.device;
        let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
        let memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f(device);
        let (validation, memory, internal) = (
            block_on(validation.pop()),
            block_on(memory.pop()),
            block_on(internal.pop()),
        );
        if let Some(e) = validation {
            return Err(err(kind, one_line(&e.to_string(), " ")));
        }
        if let Some(e) = memory {
            return Err(limit(
                Limit::GpuMemory,
                format!(
                    "the GPU is out of memory: {}",
                    one_line(&e.to_string(), " ")
                ),
            ));
        }
        if let Some(e) = internal {
            return Err(err(GpuErrorKind::Device, one_line(&e.to_string(), " ")));
        }
        Ok(value)
    }

    /// Waits for submitted work, charging the wait to the task's GPU time.
    fn wait(&mut self, submission: wgpu::SubmissionIndex) -> Result<(), GpuError> {
        let remaining = self.limits.gpu_time.saturating_sub(self.gpu_time_used);
        let started = Instant::now();
        let polled = self.gpu.device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: Some(remaining),
        });
        self.gpu_time_used += started.elapsed();
        match polled {
            // A wait can return a little after its timeout.
            Ok(_) if self.gpu_time_used > self.limits.gpu_time => Err(limit(
                Limit::GpuTime,
                format!(
                    "GPU work ran past the task's GPU time limit of {:?}",
                    self.limits.gpu_time
                ),
            )),
            Ok(_) => Ok(()),
            Err(wgpu::PollError::Timeout) => Err(limit(
                Limit::GpuTime,
                format!(
                    "GPU work ran past the task's GPU time limit of {:?}",
                    self.limits.gpu_time
                ),
            )),
            Err(e) => Err(err(GpuErrorKind::Device, e.to_string())),
        }
    }

    /// A zeroed storage buffer of `size` bytes (a multiple of 4).
    pub fn create_buffer(&mut self, size: u64) -> Result<Handle, GpuError> {
        if size == 0 || !size.is_multiple_of(4) {
            return Err(err(
                GpuErrorKind::BadArgument,
                format!("buffer size {size} is not a positive multiple of 4"),
            ));
        }
        let device_max = self
            .gpu
            .limits
            .max_buffer_size
            .min(self.gpu.limits.max_storage_buffer_binding_size);
        if self.live_bytes.saturating_add(size) > self.limits.max_buffer_bytes {
            return Err(limit(
                Limit::GpuMemory,
                format!(
                    "{} bytes of GPU buffers, over the task's limit of {}",
                    self.live_bytes + size,
                    grid_proto::units::size_text(self.limits.max_buffer_bytes)
                ),
            ));
        }
        if size > device_max {
            return Err(err(
                GpuErrorKind::BadArgument,
                format!("a buffer of {size} bytes is over this GPU's maximum of {device_max}"),
            ));
        }
        self.check_room_for_object()?;
        let buffer = self.scoped(GpuErrorKind::Device, |d| {
            d.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })?;
        self.live_bytes += size;
        Ok(self.insert(Object::Buffer { buffer, size }))
    }

    fn check_range(&self, h: Handle, offset: u64, len: u64) -> Result<&wgpu::Buffer, GpuError> {
        let (buffer, size) = self.buffer(h)?;
        if !offset.is_multiple_of(4) || !len.is_multiple_of(4) {
            return Err(err(
                GpuErrorKind::BadArgument,
                format!("offset {offset} and length {len} must be multiples of 4"),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(buffer),
            _ => Err(err(
                GpuErrorKind::BadArgument,
                format!("range {offset}+{len} is outside buffer {h} of {size} bytes"),
            )),
        }
    }

    /// Copies `data` into buffer `h` at `offset`, and waits until the copy is done: a write
    /// left pending would hold a staging copy of the data until some later submission — memory a
    /// task could pile up, and GPU time charged to whoever submits next.
    pub fn write(&mut self, h: Handle, offset: u64, data: &[u8]) -> Result<(), GpuError> {
        let buffer = self.check_range(h, offset, data.len() as u64)?;
        let queue = &self.gpu.queue;
        let submission = self.scoped(GpuErrorKind::Device, |_| {
            queue.write_buffer(buffer, offset, data);
            queue.submit([])
        })?;
        self.wait(submission)
    }

    /// Reads `len` bytes of buffer `h` from `offset`, after all the task's work so far.
    pub fn read(&mut self, h: Handle, offset: u64, len: u64) -> Result<Vec<u8>, GpuError> {
        let source = self.check_range(h, offset, len)?.clone();
        if len == 0 {
            return Ok(Vec::new());
        }
        let (staging, submission) = self.scoped(GpuErrorKind::Device, |d| {
            let staging = d.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: len,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder = d.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            encoder.copy_buffer_to_buffer(&source, offset, &staging, 0, len);
            let submission = self.gpu.queue.submit([encoder.finish()]);
            (staging, submission)
        })?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let waited = self.wait(submission);
        let bytes = waited.and_then(|()| {
            rx.recv()
                .map_err(|_| err(GpuErrorKind::Device, "the GPU dropped a read"))?
                .map_err(|e| err(GpuErrorKind::Device, e.to_string()))?;
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| err(GpuErrorKind::Device, e.to_string()))?;
            Ok(view.to_vec())
        });
        staging.unmap();
        staging.destroy();
        bytes
    }

    /// A compute kernel from WGSL source: `entry` must be a `@compute` function whose bindings
    /// are storage buffers `@group(0) @binding(0..n)`.
    pub fn create_kernel(&mut self, wgsl: &str, entry: &str) -> Result<Handle, GpuError> {
        if wgsl.len() > self.limits.max_shader_bytes {
            return Err(err(
                GpuErrorKind::Shader,
                format!(
                    "shader source of {} bytes, over the cap of {}",
                    wgsl.len(),
                    self.limits.max_shader_bytes
                ),
            ));
        }
        self.check_room_for_object()?;
        let module = naga::front::wgsl::parse_str(wgsl)
            .map_err(|e| err(GpuErrorKind::Shader, one_line(&e.emit_to_string(wgsl), " ")))?;
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default(),
        )
        .validate(&module)
        .map_err(|e| err(GpuErrorKind::Shader, one_line(&e.emit_to_string(wgsl), " ")))?;
        if !module
            .entry_points
            .iter()
            .any(|ep| ep.name == entry && ep.stage == naga::ShaderStage::Compute)
        {
            return Err(err(
                GpuErrorKind::Shader,
                format!("no @compute entry point named {entry:?}"),
            ));
        }
        let read_only = storage_bindings(&module)?;
        let (pipeline, layout) = self.scoped(GpuErrorKind::Shader, |d| {
            // An explicit layout with every declared binding: a derived one would hold only the
            // bindings this entry point uses, and a dispatch binding all n would not match it.
            let entries: Vec<wgpu::BindGroupLayoutEntry> = read_only
                .iter()
                .enumerate()
                .map(|(i, read_only)| wgpu::BindGroupLayoutEntry {
                    binding: i as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *read_only,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            let layout = d.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: None,
                entries: &entries,
            });
            let pipeline_layout = d.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: None,
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: None,
                source: wgpu::ShaderSource::Wgsl(wgsl.into()),
            });
            let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: None,
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
            (pipeline, layout)
        })?;
        Ok(self.insert(Object::Kernel {
            pipeline,
            layout,
            bindings: read_only.len() as u32,
        }))
    }

    /// Runs `kernel` over `groups` workgroups with `buffers` bound at `@binding(0..)`, and waits
    /// for it.
    pub fn dispatch(
        &mut self,
        kernel: Handle,
        buffers: &[Handle],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        let (pipeline, layout, bindings) = match self.objects.get(&kernel) {
            Some(Object::Kernel {
                pipeline,
                layout,
                bindings,
            }) => (pipeline.clone(), layout.clone(), *bindings),
            _ => {
                return Err(err(
                    GpuErrorKind::BadHandle,
                    format!("{kernel} is not a kernel of this task"),
                ));
            }
        };
        if buffers.len() != bindings as usize {
            return Err(err(
                GpuErrorKind::BadArgument,
                format!(
                    "the kernel binds {bindings} buffers, the dispatch gives {}",
                    buffers.len()
                ),
            ));
        }
        let per_dimension = self.gpu.limits.max_compute_workgroups_per_dimension;
        let total = groups.iter().map(|g| u64::from(*g)).product::<u64>();
        if groups.iter().any(|g| *g > per_dimension)
            || total > self.limits.max_workgroups_per_dispatch
        {
            return Err(limit(
                Limit::GpuDispatch,
                format!(
                    "dispatch of {groups:?} workgroups: at most {per_dimension} per dimension and {} in all",
                    self.limits.max_workgroups_per_dispatch
                ),
            ));
        }
        if self.dispatches >= self.limits.max_dispatches {
            return Err(limit(
                Limit::GpuDispatch,
                format!("more than {} dispatches", self.limits.max_dispatches),
            ));
        }
        let mut bound = Vec::with_capacity(buffers.len());
        for h in buffers {
            bound.push(self.buffer(*h)?.0.clone());
        }
        if total == 0 {
            return Ok(());
        }
        self.dispatches += 1;
        let queue = self.gpu.queue.clone();
        let submission = self.scoped(GpuErrorKind::BadArgument, |d| {
            let entries: Vec<wgpu::BindGroupEntry> = bound
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: b.as_entire_binding(),
                })
                .collect();
            let group = d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &layout,
                entries: &entries,
            });
            let mut encoder = d.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            }
            queue.submit([encoder.finish()])
        })?;
        self.wait(submission)
    }

    /// Frees a buffer or kernel.
    pub fn destroy(&mut self, h: Handle) -> Result<(), GpuError> {
        match self.objects.remove(&h) {
            Some(Object::Buffer { buffer, size }) => {
                buffer.destroy();
                self.live_bytes -= size;
                Ok(())
            }
            Some(Object::Kernel { .. }) => Ok(()),
            None => Err(err(
                GpuErrorKind::BadHandle,
                format!("{h} is not an object of this task"),
            )),
        }
    }
}

impl Drop for GpuSession {
    fn drop(&mut self) {
        for (_, object) in self.objects.drain() {
            if let Object::Buffer { buffer, .. } = object {
                buffer.destroy();
            }
        }
    }
}

/// The storage-buffer bindings of `@group(0)`, which must be `0..n` exactly: for each, whether it
/// is read-only.
fn storage_bindings(module: &naga::Module) -> Result<Vec<bool>, GpuError> {
    let mut seen = Vec::new();
    for (_, var) in module.global_variables.iter() {
        let Some(binding) = &var.binding else {
            continue;
        };
        if binding.group != 0 {
            return Err(err(
                GpuErrorKind::Shader,
                "only @group(0) bindings are supported",
            ));
        }
        let naga::AddressSpace::Storage { access } = var.space else {
            return Err(err(
                GpuErrorKind::Shader,
                "only storage buffer bindings (var<storage>) are supported",
            ));
        };
        seen.push((
            binding.binding,
            !access.contains(naga::StorageAccess::STORE),
        ));
    }
    seen.sort_unstable();
    if seen.iter().enumerate().any(|(i, (b, _))| *b != i as u32) {
        let numbers: Vec<u32> = seen.iter().map(|(b, _)| *b).collect();
        return Err(err(
            GpuErrorKind::Shader,
            format!("bindings must be numbered 0..n without gaps, got {numbers:?}"),
        ));
    }
    Ok(seen.into_iter().map(|(_, read_only)| read_only).collect())
}
