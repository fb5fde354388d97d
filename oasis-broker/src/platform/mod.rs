//! Operating-system shells around the decision core. Only Linux exists so
//! far; the Windows (WinDivert) backend will sit beside it.
#[cfg(target_os = "linux")]
pub mod linux;
