use anyhow::Result;
use clap::Args;
#[derive(Args)]
pub struct LabOptions {}
pub fn run(_o: &LabOptions) -> Result<()> { Ok(()) }
