"""What the user takes away: merged metadata, licences, attribution, citation, link rot, exports."""
