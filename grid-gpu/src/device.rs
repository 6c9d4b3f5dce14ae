//! Finding an adapter and opening the node's one device.

use crate::block_on;
use std::sync::Arc;

/// What a node reports about its GPU (`grid nodes` shows it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
}

/// The node's GPU device and queue.
pub struct GpuDevice {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) limits: wgpu::Limits,
    info: GpuInfo,
}

impl GpuDevice {
    /// Opens the first Vulkan adapter (with `cpu_only`, only CPU adapters such as Mesa's
    /// lavapipe). The error says how to install a driver when there is none.
    pub fn open(cpu_only: bool) -> Result<Self, String> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::VULKAN;
        desc.flags = wgpu::InstanceFlags::empty();
        let instance = wgpu::Instance::new(desc);
        let adapter = block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: cpu_only,
            compatible_surface: None,
            apply_limit_buckets: false,
        }))
        .map_err(|e| {
            format!(
                "no Vulkan GPU adapter ({e}); on a CPU-only Debian machine install lavapipe: \
                 apt-get install mesa-vulkan-drivers"
            )
        })?;
        let a = adapter.get_info();
        let info = GpuInfo {
            name: a.name.clone(),
            backend: format!("{:?}", a.backend).to_lowercase(),
            device_type: format!("{:?}", a.device_type).to_lowercase(),
        };
        let limits = adapter.limits();
        let (device, queue) = block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("grid"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| format!("opening GPU {}: {e}", info.name))?;
        // Errors are caught by error scopes around every call; anything else is logged, never a panic.
        device.on_uncaptured_error(Arc::new(|e| tracing::error!("uncaptured GPU error: {e}")));
        tracing::info!(adapter = %info.name, backend = %info.backend, kind = %info.device_type, "GPU opened");
        Ok(Self {
            device,
            queue,
            limits,
            info,
        })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Calls `f` with the driver's message if the device is lost (a driver reset or crash); a
    /// lost device fails every later call, so the GPU worker exits and is started anew.
    pub fn on_lost(&self, f: impl Fn(String) + Send + 'static) {
        self.device
            .set_device_lost_callback(move |reason, message| {
                if reason != wgpu::DeviceLostReason::Destroyed {
                    f(message);
                }
            });
    }
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.backend, self.device_type)
    }
}
