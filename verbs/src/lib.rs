//! om's InfiniBand/RoCE verbs transport.
//!
//! Pages go from the application's registered memory into the page server's registered image by RDMA
//! WRITE, with no copy on either side. This crate is built in issue #7; until then it is empty, and
//! asking for the verbs transport fails with a clear error in `omctl`.
