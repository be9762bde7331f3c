//! Exposes the target interpreter's build flags (`Py_LIMITED_API`, `PyPy`,
//! `Py_GIL_DISABLED`, ...) as cfgs, so unsupported builds are refused with a
//! clear message at compile time.
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
