//! Stopping: the drain that lets the app's last requests finish (`drain`), and stopping by
//! itself once the app is done (`idle_exit`, `--exit-when-idle-after`).
pub(crate) mod drain;
pub(crate) mod idle_exit;
