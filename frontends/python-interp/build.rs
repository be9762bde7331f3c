//! The target interpreter's build flags (`Py_3_13`, `Py_GIL_DISABLED`) as cfgs.
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
